"""The gateway's observability: a traced, timed view of the core, ``GET /metrics`` and per-request counters.

:class:`InstrumentedBackend` wraps the core that both front ends call: each request gets a span named after
its GenAI operation (``chat <model>``/``text_completion <model>``) carrying the semantic-convention attributes
(``gen_ai.request.model``, ``gen_ai.usage.input_tokens``, ...), under which the throttler, prefill and decode
calls are made; it observes the client-seen TTFT, inter-token latency and end-to-end latency.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import FastAPI, Response

from stageserve.serving.common import metrics, tracing
from stageserve.serving.gateway.http import GenerateDelta, HttpGenerateRequest


def operation(request_id: str) -> str:
    """The gen_ai.operation.name of a request, from the id prefix its endpoint gives it."""
    return "chat" if request_id.startswith("chatcmpl-") else "text_completion"


class InstrumentedBackend:
    """The gateway core (everything but ``generate`` is forwarded unchanged)."""

    def __init__(self, core: Any) -> None:
        self.core = core
        metrics.init_gateway(core.model_name)
        metrics.bind_gateway_counters(
            {
                "stageserve_gateway_migrations": lambda: _stat(core, "migrator", "stats", "migrations"),
                "stageserve_gateway_migrated_requests": lambda: _stat(core, "migrator", "stats", "migrated_requests"),
                "stageserve_gateway_migrations_exhausted": lambda: _stat(core, "migrator", "stats", "exhausted"),
                "stageserve_gateway_throttler_fallback_admissions": lambda: _stat(
                    core, "fallback", "fallback_admissions"
                ),
            }
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def generate(self, request: HttpGenerateRequest) -> AsyncIterator[GenerateDelta]:
        model = self.core.model_name
        op = operation(request.request_id)
        p = request.params
        span = tracing.start_span(
            f"{op} {model}",
            {
                "gen_ai.operation.name": op,
                "gen_ai.provider.name": "stageserve",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": p.max_tokens,
                "gen_ai.request.temperature": p.temperature,
                "gen_ai.request.top_p": p.top_p,
                "gen_ai.response.id": request.request_id,
                "gen_ai.usage.input_tokens": len(request.prompt_token_ids),
                "stageserve.user": request.tenant.user,
                "stageserve.app": request.tenant.app,
                "stageserve.interaction_id": request.tenant.interaction_id,
            },
        )
        timer = metrics.gateway_timer(model)

        def on_delta(delta: GenerateDelta) -> None:
            now = time.perf_counter()
            timer.tokens(len(delta.token_ids), now)
            if delta.finished:
                timer.finish(now)
                tracing.set_attributes(
                    {
                        "gen_ai.usage.output_tokens": delta.completion_tokens,
                        "gen_ai.response.model": model,
                        "gen_ai.response.finish_reasons": [delta.finish_reason or "stop"],
                        "stageserve.cached_tokens": delta.cached_tokens,
                    },
                    span,
                )

        return tracing.traced_stream(self.core.generate(request), span, on_delta)


def _stat(obj: Any, *path: str) -> float:
    """A counter the core keeps (0 while that part of the gateway does not exist)."""
    for name in path:
        obj = getattr(obj, name, None)
    return float(obj or 0)


def grpc_interceptors(model_name: str) -> list[Any]:
    """Server interceptors of the gateway's gRPC server: tracing, and requests counted by status."""

    def done(method: str, code: grpc.StatusCode) -> None:
        if method.endswith("/Generate"):
            metrics.count_gateway_request(model_name, "grpc", code.name)

    return tracing.server_interceptors(on_done=done)


def install(app: FastAPI, model_name: str) -> None:
    """Adds ``GET /metrics`` and the tracing middleware (which also counts ``/v1/*`` requests by status)."""

    def done(path: str, status: int) -> None:
        if path.endswith("/completions"):
            metrics.count_gateway_request(model_name, "http", status)

    native = getattr(app, "_telemetry", None)  # FastAPI >= 0.165 traces natively: keep one server span, ours
    if isinstance(native, dict):
        native.update(tracing=False, operation_spans=False)
    app.add_middleware(tracing.TraceMiddleware, on_done=done)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
