"""Malformed protobuf requests end as INVALID_ARGUMENT naming the problem, not as grpc's INTERNAL.

grpc.aio answers a request it cannot deserialize (truncated bytes, invalid UTF-8 in a string field, a wrong
wire type) with ``UNKNOWN: Unexpected DecodeError`` (sync grpc: ``INTERNAL``). This interceptor wraps every method's
deserializer so such a request reaches the handler as a marker, which is then rejected with
``INVALID_ARGUMENT: request: malformed <Message>: <reason>``; for client-streaming methods the bad frame
ends the stream the same way. Handlers never see the marker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class _Malformed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError and friends: any undecodable payload
            name = getattr(deserialize, "__qualname__", "message").split(".")[0]
            return _Malformed(f"request: malformed {name}: {exc or type(exc).__name__}")

    return parse


async def _reject(context: grpc.aio.ServicerContext, bad: _Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.reason)


def _guard_unary(behavior: Callable[..., Any], streaming_response: bool) -> Callable[..., Any]:
    if streaming_response:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                await _reject(context, request)
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await _reject(context, request)
        return await behavior(request, context)

    return unary


def _guard_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Malformed):
                await _reject(context, request)
            yield request

    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked(requests, context), context)

    return call


class WireGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        safe = _safe(handler.request_deserializer)
        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=safe, unary_unary=_guard_unary(handler.unary_unary, False))
        if handler.unary_stream is not None:
            return handler._replace(request_deserializer=safe, unary_stream=_guard_unary(handler.unary_stream, True))
        if handler.stream_unary is not None:
            return handler._replace(request_deserializer=safe, stream_unary=_guard_stream(handler.stream_unary))
        return handler  # stream-stream: none in stageserve
