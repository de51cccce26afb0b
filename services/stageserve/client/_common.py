"""What the sync and async clients share: result types, typed errors, request building and retry timing."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc

from stageserve.v1 import common_pb2, gateway_pb2

USER_KEY = "x-stageserve-user"
APP_KEY = "x-stageserve-app"
INTERACTION_KEY = "x-stageserve-interaction-id"
CALL_INDEX_KEY = "x-stageserve-call-index"
KV_FORMAT_KEY = "x-stageserve-kv-format"
RETRY_AFTER_KEY = "retry-after"
MAX_BACKOFF_S = 10.0

Metadata = tuple[tuple[str, str], ...]


# ---- results ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    """Token counts of one request; ``cached_tokens`` are prompt tokens served from the prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """The whole answer of a non-streaming ``generate``/``chat``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    request_id: str
    interaction_id: str | None


@dataclass(frozen=True)
class StreamEvent:
    """One token event of a stream: the new text and token ids; the last one has ``finished`` and ``usage``."""

    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    usage: Usage | None = None
    request_id: str = ""


class ModelInfo(NamedTuple):
    """A served model: ``(id, max_context)``."""

    id: str
    max_context: int


# ---- errors -------------------------------------------------------------------------------------------
class StageServeError(Exception):
    """Any failed call. ``code`` is the grpc.StatusCode, ``details`` the server's message and ``attempts``
    how many times the call was sent (more than 1 after automatic retries)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        retry_after_s: float | None = None,
        trailing_metadata: Metadata = (),
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s
        self.trailing_metadata = trailing_metadata
        self.attempts = 1


class InvalidRequest(StageServeError):
    """INVALID_ARGUMENT: bad input; ``field`` names the offending field when the message starts with it."""

    @property
    def field(self) -> str | None:
        match = re.match(r"\s*([A-Za-z_][\w.\[\]-]*):", self.details)
        return match.group(1) if match else None


class Overloaded(StageServeError):
    """RESOURCE_EXHAUSTED: the deployment is overloaded; retry after ``retry_after_s`` seconds."""


class ModelNotFound(StageServeError):
    """NOT_FOUND: the requested model is not served."""


class Unavailable(StageServeError):
    """UNAVAILABLE: the gateway is unreachable or no healthy stage could take the request."""


class AuthenticationError(StageServeError):
    """UNAUTHENTICATED: missing or invalid API key."""


class PermissionDenied(StageServeError):
    """PERMISSION_DENIED: the caller may not do this."""


class KVTransferError(StageServeError):
    """DATA_LOSS: moving the KV cache from prefill to decode failed."""


class DeadlineExceeded(StageServeError):
    """DEADLINE_EXCEEDED: the call did not finish within its timeout."""


_ERRORS: dict[grpc.StatusCode, type[StageServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DATA_LOSS: KVTransferError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def map_error(exc: grpc.RpcError, attempts: int = 1) -> StageServeError:
    """The one mapping from a grpc.RpcError (sync or aio) to a typed StageServeError."""
    code = _call(exc, "code") or grpc.StatusCode.UNKNOWN
    details = _call(exc, "details") or code.name
    trailing = tuple(
        (str(k), v if isinstance(v, str) else v.decode()) for k, v in (_call(exc, "trailing_metadata") or ())
    )
    retry_after: float | None = None
    for key, value in trailing:
        if key.lower() == RETRY_AFTER_KEY:
            try:
                retry_after = max(0.0, float(value))
            except ValueError:
                pass
    err = _ERRORS.get(code, StageServeError)(code, details, retry_after_s=retry_after, trailing_metadata=trailing)
    err.attempts = attempts
    return err


def _call(exc: grpc.RpcError, name: str) -> Any:
    method = getattr(exc, name, None)
    try:
        return method() if callable(method) else None
    except Exception:  # a half-initialised call object; fall back to defaults
        return None


def invalid(field_name: str, message: str) -> InvalidRequest:
    """A client-side validation error, shaped like the gateway's (``field: message``)."""
    return InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {message}")


# ---- requests -----------------------------------------------------------------------------------------
def _non_negative(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(name, f"must be a non-negative integer, got {value!r}")
    return value


def build_sampling(
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: str | Sequence[str] | None,
    stop_token_ids: Iterable[int] | None,
    ignore_eos: bool,
    min_tokens: int,
) -> common_pb2.SamplingParams:
    # max_tokens 0 on the wire means "server default" (16), so reject it here instead of silently changing it.
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise invalid("max_tokens", f"must be a positive integer, got {max_tokens!r}")
    msg = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        stop_token_ids=[_non_negative("stop_token_ids", t) for t in (stop_token_ids or ())],
        ignore_eos=bool(ignore_eos),
        min_tokens=_non_negative("min_tokens", min_tokens),
    )
    if seed is not None:
        msg.seed = int(seed)
    return msg


def build_request(
    *,
    model: str | None,
    prompt: str | Sequence[int] | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    sampling: common_pb2.SamplingParams,
    request_id: str | None = None,
) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(model=model or "", sampling=sampling, request_id=request_id or "")
    if messages is not None:
        chat = request.chat
        chat.SetInParent()
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise invalid(f"messages[{i}]", "must be a mapping with role and content")
            msg = chat.messages.add(role=str(m.get("role", "")), content=str(m.get("content", "")))
            for j, image in enumerate(m.get("images") or ()):
                msg.images.add(data=_image_bytes(image, f"messages[{i}].images[{j}]"))
    elif isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None and not isinstance(prompt, bytes | bytearray):
        ids = request.prompt_token_ids
        ids.SetInParent()
        ids.ids.extend(_non_negative("prompt", t) for t in prompt)
    else:
        raise invalid("prompt", "must be a string or a list of token ids")
    return request


def _image_bytes(image: Any, field_name: str) -> bytes:
    """An image given as encoded bytes or as a path to an image file."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        try:
            with open(image, "rb") as f:
                return f.read()
        except OSError as exc:
            raise invalid(field_name, f"cannot read image file {str(image)!r}: {exc.strerror}") from None
    raise invalid(field_name, "must be image bytes or a path to an image file")


def build_metadata(
    *,
    user: str | None,
    app: str | None,
    api_key: str | None,
    interaction_id: str | None = None,
    call_index: int = 0,
    kv_format: str | None = None,
) -> Metadata:
    md: list[tuple[str, str]] = []
    if user is not None:
        md.append((USER_KEY, user))
    if app is not None:
        md.append((APP_KEY, app))
    if api_key is not None:
        md.append(("authorization", f"Bearer {api_key}"))
    if interaction_id:
        md.append((INTERACTION_KEY, interaction_id))
    md.append((CALL_INDEX_KEY, str(_non_negative("call_index", call_index))))
    if kv_format:
        md.append((KV_FORMAT_KEY, kv_format.lower()))
    return tuple(md)


def interaction_from(metadata: Iterable[tuple[str, str | bytes]] | None, default: str | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == INTERACTION_KEY:
            return value if isinstance(value, str) else value.decode()
    return default


def event_from_proto(event: common_pb2.TokenEvent) -> StreamEvent:
    usage = None
    if event.HasField("usage"):
        u = event.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    return StreamEvent(
        text=event.text,
        token_ids=list(event.token_ids),
        finished=event.finished,
        finish_reason=event.finish_reason or None,
        usage=usage,
        request_id=event.request_id,
    )


class Collector:
    """Folds a stream's events into a Completion."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.last: StreamEvent | None = None
        self.request_id = ""

    def add(self, event: StreamEvent) -> None:
        self.text.append(event.text)
        self.token_ids.extend(event.token_ids)
        self.request_id = event.request_id or self.request_id
        self.last = event

    def completion(self, interaction_id: str | None) -> Completion:
        last = self.last
        if last is None or not last.finished:
            raise StageServeError(grpc.StatusCode.UNKNOWN, "the stream ended before its final event")
        usage = last.usage or Usage(0, len(self.token_ids), 0)
        return Completion(
            "".join(self.text), self.token_ids, last.finish_reason, usage, self.request_id, interaction_id
        )


# ---- retries ------------------------------------------------------------------------------------------
@dataclass
class RetryPolicy:
    """When to retry a call that failed before producing any output, and how long to wait first."""

    max_retries: int
    backoff_s: float
    retry_on_overload: bool

    def delay(self, err: StageServeError, retries_done: int, time_left: float) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise ``err``."""
        if retries_done >= self.max_retries:
            return None
        if isinstance(err, Unavailable):
            base = min(self.backoff_s * (2**retries_done), MAX_BACKOFF_S)
            wait = base * random.uniform(0.5, 1.5)  # jitter spreads clients that failed together
        elif isinstance(err, Overloaded) and self.retry_on_overload:
            wait = err.retry_after_s if err.retry_after_s is not None else self.backoff_s * (2**retries_done)
        else:
            return None
        return wait if wait < time_left else None
