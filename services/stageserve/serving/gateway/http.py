"""The gateway's OpenAI-compatible HTTP API: chat completions, completions, models and health.

The app speaks only to a ``GenerateBackend`` (the gateway core, or an in-process engine in tests): it parses
and validates the OpenAI request body, tokenizes, builds ``SamplingParams`` and the tenant identity from the
``x-stageserve-*`` headers, and turns the backend's cumulative ``GenerateDelta`` stream into an OpenAI JSON
response or Server-Sent Events. Every error leaves as ``{"error": {"message", "type", "param", "code"}}``
with the HTTP status of the table in ``serving/common/errors.py``; a client that disconnects closes the
backend's generator, which aborts the request upstream.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from stageserve.core.sampling import SamplingParams
from stageserve.models.multimodal import IMAGE_MARKER
from stageserve.serving.common.errors import BadRequest, ModelNotFound, StageServeError, classify

log = logging.getLogger(__name__)

USER_HEADER = "x-stageserve-user"
APP_HEADER = "x-stageserve-app"
INTERACTION_HEADER = "x-stageserve-interaction-id"
CALL_INDEX_HEADER = "x-stageserve-call-index"
KV_FORMAT_HEADER = "x-stageserve-kv-format"
DEFAULT_USER = "anonymous"
DEFAULT_APP = "default"
IMAGES_UNSUPPORTED = "images are not supported by this deployment yet"  # backends without read_image_url
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI legacy completions default; chat defaults to the rest of the context
_IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})


# ---- the contract with the gateway core -----------------------------------------------------------------
@dataclass(frozen=True)
class TenantHeaders:
    user: str
    app: str
    interaction_id: str
    call_index: int


@dataclass(frozen=True)
class HttpGenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: TenantHeaders
    kv_format: str | None = None  # x-stageserve-kv-format: override the negotiated KV format (benchmarks)
    system_tokens: int = 0  # prompt tokens from system/developer messages (fairness accounting)
    images: tuple[bytes, ...] = ()  # encoded image files, in prompt order (encoder stage)
    image_positions: tuple[int, ...] = ()  # prompt position of each image's first placeholder token


@dataclass
class GenerateDelta:
    """New text/tokens of one request; the token counts are cumulative; the last delta has finished=True."""

    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class GenerateBackend(Protocol):
    model_name: str
    max_context: int

    def tokenize_prompt(self, text: str) -> list[int]: ...

    def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def generate(self, request: HttpGenerateRequest) -> AsyncIterator[GenerateDelta]: ...


# ---- request bodies --------------------------------------------------------------------------------------
_STRICT = ConfigDict(strict=True, extra="ignore")


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = False


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = _STRICT
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None  # image parts: a base64 data: URL (http(s) only when enabled)


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: str
    content: str | list[ContentPart] | None = None


class SamplingBody(BaseModel):
    """The fields chat and completions share (OpenAI's plus the ``top_k``/``ignore_eos``/``min_tokens``
    extensions). Unknown fields are ignored, as OpenAI clients send many optional ones."""

    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0


class ChatCompletionBody(SamplingBody):
    messages: list[ChatMessage]


class CompletionBody(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]


Body = TypeVar("Body", bound=SamplingBody)


# ---- errors ----------------------------------------------------------------------------------------------
def error_body(err: StageServeError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.error_type, "param": err.field, "code": err.http_status}}


def error_response(exc: BaseException, headers: Mapping[str, str] | None = None) -> JSONResponse:
    err = classify(exc)
    if err.http_status >= 500:
        log.error("request failed: %s", err.message, exc_info=exc)
    out = dict(headers or {})
    if err.retry_after_s is not None:
        out["Retry-After"] = str(max(0, math.ceil(err.retry_after_s)))
    return JSONResponse(error_body(err), status_code=err.http_status, headers=out)


def _from_validation(exc: ValidationError | RequestValidationError) -> BadRequest:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return BadRequest(f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [str(p) for p in first["loc"] if p != "body"]
    if not loc:
        return BadRequest(f"request body: {first['msg']}")
    return BadRequest(f"{'.'.join(loc)}: {first['msg']}", field=loc[0])


def _install_error_handlers(app: FastAPI) -> None:
    async def on_validation(_: Request, exc: Exception) -> Response:
        return error_response(_from_validation(exc))  # type: ignore[arg-type]

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        err = StageServeError(str(exc.detail))
        err.http_status, err.error_type = exc.status_code, "invalid_request_error"
        return error_response(err, exc.headers)

    async def on_any(_: Request, exc: Exception) -> Response:
        return error_response(exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_any)


# ---- request -> backend request ----------------------------------------------------------------------------
async def _parse_body(request: Request, body_type: type[Body]) -> Body:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return body_type.model_validate_json(text)
    except ValidationError as exc:
        raise _from_validation(exc) from None


def tenant_from_headers(headers: Mapping[str, str], interaction_id: str, body_user: str | None) -> TenantHeaders:
    raw = headers.get(CALL_INDEX_HEADER, "0").strip() or "0"
    try:
        call_index = int(raw)
    except ValueError:
        raise BadRequest(f"{CALL_INDEX_HEADER} must be an integer, got {raw!r}", field=CALL_INDEX_HEADER) from None
    if call_index < 0:
        raise BadRequest(f"{CALL_INDEX_HEADER} must be >= 0, got {call_index}", field=CALL_INDEX_HEADER)
    user = headers.get(USER_HEADER) or body_user or DEFAULT_USER
    return TenantHeaders(user, headers.get(APP_HEADER) or DEFAULT_APP, interaction_id, call_index)


def _check_supported(backend: GenerateBackend, body: SamplingBody) -> None:
    if body.model is not None and body.model != backend.model_name:
        raise ModelNotFound(
            f"The model `{body.model}` does not exist; this server serves `{backend.model_name}`.", "model"
        )
    if body.n not in (None, 1):
        raise BadRequest(f"n: only n=1 is supported, got {body.n}", field="n")


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type in _IMAGE_PART_TYPES:  # its bytes were read by _chat_images, in this same order
            texts.append(IMAGE_MARKER)
            continue
        if part.type != "text" or part.text is None:
            raise BadRequest(f"unsupported content part of type {part.type!r}", field=f"messages.{index}.content")
        texts.append(part.text)
    return "\n".join(texts)


def _chat_prompt(backend: GenerateBackend, body: ChatCompletionBody) -> list[int]:
    if not body.messages:
        raise BadRequest("messages must contain at least one message", field="messages")
    messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)]
    try:
        return list(backend.tokenize_chat(messages))
    except ValueError as exc:
        raise BadRequest(f"messages: {exc}", field="messages") from None


def _completion_prompt(backend: GenerateBackend, body: CompletionBody) -> list[int]:
    prompt: Any = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, list) and any(not isinstance(t, int) for t in prompt):
        raise BadRequest("prompt: only one prompt per request is supported", field="prompt")
    ids = list(prompt) if isinstance(prompt, list) else list(backend.tokenize_prompt(prompt))
    if not ids:
        raise BadRequest("prompt is empty", field="prompt")
    return ids


def _context_error(max_context: int, prompt_len: int, max_tokens: int, prompt_field: str, max_field: str) -> BadRequest:
    message = (
        f"This model's maximum context length is {max_context} tokens, but the request has {prompt_len} prompt "
        f"tokens and asks for {max_tokens} completion tokens; shorten the {prompt_field} or lower {max_field}."
    )
    return BadRequest(message, field=prompt_field if prompt_len >= max_context else max_field)


def _sampling_params(body: SamplingBody, prompt_len: int, max_context: int, ep: _Endpoint) -> SamplingParams:
    max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if requested is not None and requested < 1:
        raise BadRequest(f"{max_field} must be >= 1, got {requested}", field=max_field)
    max_tokens = requested or min(ep.default_max_tokens or max_context, max(1, max_context - prompt_len))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        ignore_eos=bool(body.ignore_eos),
        min_tokens=body.min_tokens or 0,
    )
    if prompt_len + max_tokens > max_context:
        raise _context_error(max_context, prompt_len, max_tokens, ep.prompt_field, max_field)
    return params


# ---- responses -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Call:
    """What the response needs to know about the request it answers."""

    id: str
    created: int
    model: str
    prompt_len: int
    include_usage: bool


def _chat_choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}


def _chat_chunk_choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish_reason}


def _text_choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


@dataclass(frozen=True)
class _Endpoint:
    body_type: type[SamplingBody]
    id_prefix: str
    object: str
    chunk_object: str
    prompt_field: str
    default_max_tokens: int | None
    prompt_ids: Callable[[GenerateBackend, Any], list[int]]
    choice: Callable[[str, str | None], dict[str, Any]]
    chunk_choice: Callable[[str, str | None], dict[str, Any]]
    first_chunk_choice: dict[str, Any] | None  # sent before any text (chat: the assistant role)


_CHAT = _Endpoint(
    ChatCompletionBody,
    "chatcmpl-",
    "chat.completion",
    "chat.completion.chunk",
    "messages",
    None,
    _chat_prompt,
    _chat_choice,
    _chat_chunk_choice,
    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
)
_COMPLETION = _Endpoint(
    CompletionBody,
    "cmpl-",
    "text_completion",
    "text_completion",
    "prompt",
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    _completion_prompt,
    _text_choice,
    _text_choice,
    None,
)


def _usage(last: GenerateDelta, call: _Call) -> dict[str, Any]:
    prompt = last.prompt_tokens or call.prompt_len
    return {
        "prompt_tokens": prompt,
        "completion_tokens": last.completion_tokens,
        "total_tokens": prompt + last.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
    }


def _envelope(call: _Call, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": call.id, "object": obj, "created": call.created, "model": call.model, "choices": choices}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _close(stream: AsyncIterator[GenerateDelta]) -> None:
    """Closes the backend's generator (aborting its request upstream), even inside a cancelled scope."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


async def _watch_disconnect(request: Request, gone: anyio.Event, scope: anyio.CancelScope) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()
    scope.cancel()


async def _drain(stream: AsyncIterator[GenerateDelta]) -> tuple[str, GenerateDelta | None]:
    parts: list[str] = []
    last: GenerateDelta | None = None
    async for delta in stream:
        parts.append(delta.text)
        last = delta
        if delta.finished:
            break
    return "".join(parts), last


async def _collect(request: Request, stream: AsyncIterator[GenerateDelta]) -> tuple[str, GenerateDelta] | None:
    """All of a non-streaming request's output, or None when the client went away first (request aborted)."""
    gone = anyio.Event()
    result: tuple[str, GenerateDelta | None] | Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_disconnect, request, gone, tg.cancel_scope)
            try:
                result = await _drain(stream)
            except Exception as exc:  # raised below, not wrapped in the task group's ExceptionGroup
                result = exc
            tg.cancel_scope.cancel()
    finally:
        await _close(stream)
    if gone.is_set():
        return None
    if isinstance(result, Exception):
        raise result
    if result is None or result[1] is None:
        raise StageServeError("the backend ended the request without any output")
    return result[0], result[1]


async def _json_response(
    request: Request, ep: _Endpoint, call: _Call, stream: AsyncIterator[GenerateDelta], headers: dict[str, str]
) -> Response:
    result = await _collect(request, stream)
    if result is None:
        return Response(status_code=499, headers=headers)  # nobody is listening any more
    text, last = result
    body = _envelope(call, ep.object, [ep.choice(text, last.finish_reason)])
    body["usage"] = _usage(last, call)
    return JSONResponse(body, headers=headers)


async def _chunks(
    ep: _Endpoint, call: _Call, first: GenerateDelta | None, stream: AsyncIterator[GenerateDelta]
) -> AsyncIterator[dict[str, Any]]:
    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = _envelope(call, ep.chunk_object, choices)
        return {**out, "usage": None} if call.include_usage else out

    if ep.first_chunk_choice is not None:
        yield chunk([ep.first_chunk_choice])
    delta, last = first, first
    while delta is not None:
        last = delta
        if delta.text or delta.finished:
            yield chunk([ep.chunk_choice(delta.text, delta.finish_reason if delta.finished else None)])
        delta = None if delta.finished else await anext(stream, None)
    if call.include_usage and last is not None:
        yield {**chunk([]), "usage": _usage(last, call)}


async def _event_stream(
    ep: _Endpoint, call: _Call, first: GenerateDelta | None, stream: AsyncIterator[GenerateDelta]
) -> AsyncIterator[str]:
    try:
        async for payload in _chunks(ep, call, first, stream):
            yield _sse(payload)
    except Exception as exc:  # after the 200 went out, an error can only be reported in the stream
        err = classify(exc)
        log.error("stream %s failed: %s", call.id, err.message, exc_info=exc)
        yield _sse(error_body(err))
    finally:
        await _close(stream)
    yield _sse("[DONE]")


class _EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, so a disconnect aborts the request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


async def _stream_response(
    ep: _Endpoint, call: _Call, stream: AsyncIterator[GenerateDelta], headers: dict[str, str]
) -> Response:
    try:  # wait for the first delta so that errors before any output still get their HTTP status
        first = await anext(stream, None)
    except BaseException:
        await _close(stream)
        raise
    sse_headers = {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _EventStreamResponse(
        _event_stream(ep, call, first, stream), media_type="text/event-stream", headers=sse_headers
    )


# ---- the app ---------------------------------------------------------------------------------------------
def _system_tokens(backend: GenerateBackend, body: ChatCompletionBody) -> int:
    """Approximate system-prompt tokens: the system/developer messages' text, tokenized on its own."""
    texts = [_message_text(m, i) for i, m in enumerate(body.messages) if m.role in ("system", "developer")]
    return sum(len(backend.tokenize_prompt(t)) for t in texts if t)


async def _chat_images(backend: GenerateBackend, body: SamplingBody) -> list[bytes]:
    """The bytes of every image part of a chat, in prompt order (data: URLs; remote ones when enabled)."""
    if not isinstance(body, ChatCompletionBody):
        return []
    images = []
    for i, m in enumerate(body.messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type not in _IMAGE_PART_TYPES:
                continue
            if not hasattr(backend, "read_image_url"):
                raise BadRequest(IMAGES_UNSUPPORTED, field=f"messages.{i}.content")
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            field = f"messages.{i}.content.{j}.image_url"
            if not url:
                raise BadRequest(f"{field}: an image part needs image_url.url", field=field)
            images.append(await backend.read_image_url(url, field))  # type: ignore[attr-defined]
    return images


def _chat_prompt_images(
    backend: GenerateBackend, body: ChatCompletionBody, images: list[bytes]
) -> tuple[list[int], list[int]]:
    messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)]
    return backend.tokenize_chat_images(messages, images)  # type: ignore[attr-defined,no-any-return]


def _prepare(
    backend: GenerateBackend,
    ep: _Endpoint,
    body: SamplingBody,
    tenant: TenantHeaders,
    images: list[bytes] | None = None,
) -> tuple[HttpGenerateRequest, _Call]:
    _check_supported(backend, body)
    positions: list[int] = []
    if images:
        prompt_ids, positions = _chat_prompt_images(backend, body, images)  # type: ignore[arg-type]
    else:
        prompt_ids = ep.prompt_ids(backend, body)
    params = _sampling_params(body, len(prompt_ids), backend.max_context, ep)
    request_id = f"{ep.id_prefix}{uuid.uuid4().hex}"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    call = _Call(request_id, int(time.time()), backend.model_name, len(prompt_ids), include_usage)
    request = HttpGenerateRequest(
        request_id, prompt_ids, params, tenant, images=tuple(images or ()), image_positions=tuple(positions)
    )
    return request, call


async def _serve(request: Request, backend: GenerateBackend, ep: _Endpoint) -> Response:
    interaction_id = request.headers.get(INTERACTION_HEADER) or uuid.uuid4().hex
    headers = {INTERACTION_HEADER: interaction_id}
    try:
        body = await _parse_body(request, ep.body_type)
        tenant = tenant_from_headers(request.headers, interaction_id, body.user)
        keys = getattr(backend, "api_keys", None)  # gateway/identity.py: per-tenant API keys, when configured
        if keys:
            tenant = keys.authorize(tenant, request.headers, request.headers.get("authorization"))
        generate_request, call = _prepare(backend, ep, body, tenant, await _chat_images(backend, body))
        if isinstance(body, ChatCompletionBody):
            generate_request = dataclasses.replace(generate_request, system_tokens=_system_tokens(backend, body))
        kv_format = request.headers.get(KV_FORMAT_HEADER)
        if kv_format:
            generate_request = dataclasses.replace(generate_request, kv_format=kv_format)
        stream = backend.generate(generate_request)
        if body.stream:
            return await _stream_response(ep, call, stream, headers)
        return await _json_response(request, ep, call, stream, headers)
    except Exception as exc:
        return error_response(exc, headers)


def _model_card(backend: GenerateBackend, created: int) -> dict[str, Any]:
    return {
        "id": backend.model_name,
        "object": "model",
        "created": created,
        "owned_by": "stageserve",
        "max_model_len": backend.max_context,
    }


def create_app(backend: GenerateBackend) -> FastAPI:
    """The OpenAI-compatible HTTP app over ``backend``."""
    app = FastAPI(title="stageserve gateway", summary="OpenAI-compatible API of the stageserve gateway")
    _install_error_handlers(app)
    created = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(request, backend, _CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(request, backend, _COMPLETION)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(backend, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        if model_id != backend.model_name:
            return error_response(ModelNotFound(f"The model `{model_id}` does not exist.", "model"))
        return JSONResponse(_model_card(backend, created))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
