"""OpenTelemetry tracing of every hop; the only module that imports opentelemetry.

One trace per request: the gateway's HTTP (or gRPC) server span, its ``chat``/``text_completion`` span with
the GenAI semantic-convention attributes, then a client and a server span for each gRPC hop (throttler,
prefill, decode) and a ``kv_transfer`` span (bytes, format, pages) around prefill's push to decode. The W3C
``traceparent`` travels in gRPC metadata (the interceptors below) and HTTP headers (:class:`TraceMiddleware`).

Exporters, all off unless configured by the environment:
- OTLP (gRPC) when ``OTEL_TRACES_EXPORTER`` names ``otlp`` or ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` is set;
  the exporter reads the other standard ``OTEL_EXPORTER_OTLP_*`` variables itself;
- ``console`` in ``OTEL_TRACES_EXPORTER``: spans printed to stdout;
- ``STAGESERVE_TRACE_DIR``: every process appends its finished spans as JSON lines to
  ``DIR/<stage>-<replica>-<pid>.jsonl`` (tests and local debugging).
``OTEL_SDK_DISABLED=true`` turns tracing off entirely; context still propagates unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

TRACE_DIR_ENV = "STAGESERVE_TRACE_DIR"
TRACER_NAME = "stageserve"
# Polled or infrastructure RPCs that would flood the traces: never traced.
UNTRACED_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/GetLoad", "/ReportLoad")

tracer = trace.get_tracer(TRACER_NAME)


# ---- setup ---------------------------------------------------------------------------------------------------
class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON object per line (ids in hex, as W3C writes them)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_record(s)) + "\n" for s in spans]
        with self._lock, self.path.open("a") as out:
            out.writelines(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def span_record(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


def setup(stage: str, replica: int = 0, environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Installs the process's tracer provider for ``stage``; returns it (None when OTEL_SDK_DISABLED)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    resource = Resource.create(
        {"service.name": f"stageserve-{stage}", "service.instance.id": f"{stage}-{replica}", "stageserve.stage": stage}
    )
    provider = TracerProvider(resource=resource)
    for processor in _processors(stage, replica, env):
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def _processors(stage: str, replica: int, env: Mapping[str, str]) -> list[Any]:
    names = {n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()}
    out: list[Any] = []
    if "none" in names:
        names = set()
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        names.add("otlp")
    if "otlp" in names:
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        if protocol != "grpc":
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: only 'grpc' is supported, got {protocol!r}")
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        out.append(BatchSpanProcessor(OTLPSpanExporter()))
    if "console" in names:
        out.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    unknown = names - {"otlp", "console"}
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {sorted(unknown)[0]!r} (otlp, console, none)")
    directory = env.get(TRACE_DIR_ENV)
    if directory:
        path = Path(directory) / f"{stage}-{replica}-{os.getpid()}.jsonl"
        out.append(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    return out


# ---- spans -----------------------------------------------------------------------------------------------------
def set_attributes(attributes: Mapping[str, Any], span: Span | None = None) -> None:
    """Sets attributes on ``span`` (default: the current span); None values are skipped."""
    target = span if span is not None else trace.get_current_span()
    for key, value in attributes.items():
        if value is not None:
            target.set_attribute(key, value)


def start_span(name: str, attributes: Mapping[str, Any] | None = None, kind: SpanKind = SpanKind.INTERNAL) -> Span:
    """A span, child of the current one, not made current (end it yourself, or use :func:`use`)."""
    return tracer.start_span(name, kind=kind, attributes=dict(attributes or {}))


@contextmanager
def use(span: Span) -> Iterator[Span]:
    """Makes ``span`` current inside the block (tasks created inside inherit it); does not end it."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    finally:
        otel_context.detach(token)


def end(span: Span, error: BaseException | None = None) -> None:
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    span.end()


async def traced_stream(stream: AsyncIterator[Any], span: Span, on_item: Callable[[Any], None]) -> AsyncIterator[Any]:
    """Iterates ``stream`` with ``span`` current during each step (never across a yield, so the caller's
    context is untouched), calls ``on_item`` per item, and ends the span when the stream ends or fails."""
    error: BaseException | None = None
    try:
        while True:
            with use(span):
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    return
            on_item(item)
            yield item
    except BaseException as exc:
        error = exc
        raise
    finally:
        with use(span):
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        end(span, error if not isinstance(error, GeneratorExit) else None)


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


# ---- gRPC ------------------------------------------------------------------------------------------------------
def _traced(method: str) -> bool:
    return not any(part in method for part in UNTRACED_METHODS)


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.strip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Continues the caller's trace (``traceparent`` metadata) with a SERVER span around each traced RPC.
    ``on_done(method, code)`` (optional) is told every traced RPC's final status code."""

    def __init__(self, on_done: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self.on_done = on_done

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not _traced(method):
            return handler
        carrier = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        wrap = _wrap_stream if handler.response_streaming else _wrap_unary
        behavior = handler.unary_stream or handler.stream_stream or handler.unary_unary or handler.stream_unary
        wrapped = wrap(behavior, method, carrier, self.on_done)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _server_span(method: str, carrier: Mapping[str, str]) -> Span:
    parent = propagate.extract(carrier)
    return tracer.start_span(
        method.strip("/"), context=parent, kind=SpanKind.SERVER, attributes=_rpc_attributes(method)
    )


def _finish_server(span: Span, context: Any, error: BaseException | None, method: str, on_done: Any) -> None:
    code = _context_code(context, error)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()
    if on_done is not None:
        on_done(method, code)


def _context_code(context: Any, error: BaseException | None) -> grpc.StatusCode:
    code = None
    try:
        code = context.code()
    except Exception:  # older grpc: no code() on the aio context
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return grpc.StatusCode.OK
    cancelled = isinstance(error, (GeneratorExit, asyncio.CancelledError))
    return grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN


def _wrap_unary(behavior, method, carrier, on_done):  # type: ignore[no-untyped-def]
    async def call(request_or_iterator, context):  # type: ignore[no-untyped-def]
        span = _server_span(method, carrier)
        error: BaseException | None = None
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            return await behavior(request_or_iterator, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(token)
            _finish_server(span, context, error, method, on_done)

    return call


def _wrap_stream(behavior, method, carrier, on_done):  # type: ignore[no-untyped-def]
    async def call(request_or_iterator, context):  # type: ignore[no-untyped-def]
        span = _server_span(method, carrier)
        error: BaseException | None = None
        try:
            async for item in traced_steps(behavior(request_or_iterator, context), span):
                yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            _finish_server(span, context, error, method, on_done)

    return call


async def traced_steps(stream: AsyncIterator[Any], span: Span) -> AsyncIterator[Any]:
    """Like :func:`traced_stream` without ending the span."""
    try:
        while True:
            with use(span):
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    return
            yield item
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with use(span):
                await aclose()


class _ClientInterceptor:
    """Starts a CLIENT span for each traced call made inside a trace and injects its ``traceparent``."""

    def _prepare(self, client_call_details):  # type: ignore[no-untyped-def]
        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        if not trace.get_current_span().get_span_context().is_valid or not _traced(method):
            return None, client_call_details
        span = tracer.start_span(method.strip("/"), kind=SpanKind.CLIENT, attributes=_rpc_attributes(method))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = [*(client_call_details.metadata or ()), *carrier.items()]
        details = grpc.aio.ClientCallDetails(
            client_call_details.method,
            client_call_details.timeout,
            grpc.aio.Metadata(*metadata),
            client_call_details.credentials,
            client_call_details.wait_for_ready,
        )
        return span, details

    @staticmethod
    def _end_when_done(span: Span | None, call: Any) -> Any:
        if span is None:
            return call

        def done(finished: Any) -> None:
            asyncio.ensure_future(_end_client_span(span, finished))

        call.add_done_callback(done)
        return call


async def _end_client_span(span: Span, call: Any) -> None:
    try:
        code = await call.code()
    except BaseException:
        code = grpc.StatusCode.CANCELLED
    if isinstance(code, grpc.StatusCode):
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


class _UnaryUnary(_ClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        span, details = self._prepare(client_call_details)
        return self._end_when_done(span, await continuation(details, request))


class _UnaryStream(_ClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        span, details = self._prepare(client_call_details)
        return self._end_when_done(span, await continuation(details, request))


class _StreamUnary(_ClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        span, details = self._prepare(client_call_details)
        return self._end_when_done(span, await continuation(details, request_iterator))


def client_interceptors() -> list[Any]:
    """Interceptors for every ``grpc.aio`` channel a stage opens to another stage."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary()]


def server_interceptors(on_done: Callable[[str, grpc.StatusCode], None] | None = None) -> list[Any]:
    return [ServerInterceptor(on_done)]


# ---- HTTP --------------------------------------------------------------------------------------------------------
class TraceMiddleware:
    """ASGI middleware: continues a ``traceparent`` header (or starts a trace) with a SERVER span around each
    request under ``prefixes``, returns ``traceparent`` in the response headers, and tells ``on_done(path,
    status)`` the response status."""

    def __init__(
        self, app: Any, prefixes: tuple[str, ...] = ("/v1/",), on_done: Callable[[str, int], None] | None = None
    ) -> None:
        self.app = app
        self.prefixes = prefixes
        self.on_done = on_done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope.get("type") != "http" or not path.startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        method = scope.get("method", "GET")
        span = tracer.start_span(
            f"{method} {path}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        status = {"code": 500}
        outgoing: dict[str, str] = {}
        propagate.inject(outgoing, context=trace.set_span_in_context(span))

        async def send_traced(message: Any) -> None:
            if message.get("type") == "http.response.start":
                status["code"] = message.get("status", 500)
                headers = list(message.get("headers", ()))
                headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in outgoing.items()]
                message = {**message, "headers": headers}
            await send(message)

        error: BaseException | None = None
        try:
            with use(span):
                await self.app(scope, receive, send_traced)
        except BaseException as exc:
            error = exc
            raise
        finally:
            span.set_attribute("http.response.status_code", status["code"])
            if status["code"] >= 500:
                span.set_status(Status(StatusCode.ERROR, str(status["code"])))
            end(span, error)
            if self.on_done is not None:
                self.on_done(path, status["code"])
