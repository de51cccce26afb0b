"""Client (blocking) and AsyncClient (grpc.aio) for the gateway's Generate and ListModels RPCs."""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from stageserve.client._common import (
    Collector,
    Completion,
    Metadata,
    ModelInfo,
    RetryPolicy,
    StreamEvent,
    build_metadata,
    build_request,
    build_sampling,
    event_from_proto,
    interaction_from,
    map_error,
)
from stageserve.v1 import gateway_pb2, gateway_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_MIN_TIMEOUT_S = 0.001


class _Base(abc.ABC):
    """Settings and request building shared by Client and AsyncClient."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        user: str | None = None,
        app: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 0.2,
        retry_on_overload: bool = False,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries: must be >= 0")
        self.address = address
        self.user = user
        self.app = app
        self.api_key = api_key
        self.timeout = timeout
        self.retry = RetryPolicy(max_retries, backoff_s, retry_on_overload)
        self._open()

    @abc.abstractmethod
    def _open(self) -> None:
        """Creates the channel and stub (a blocking one for Client, grpc.aio for AsyncClient)."""

    def _prepare(
        self,
        *,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        model: str | None,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        stop: str | Sequence[str] | None,
        stop_token_ids: Sequence[int] | None,
        ignore_eos: bool,
        min_tokens: int,
        interaction_id: str | None,
        call_index: int,
        kv_format: str | None,
        request_id: str | None,
    ) -> tuple[gateway_pb2.GenerateRequest, Metadata]:
        sampling = build_sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
        )
        request = build_request(model=model, prompt=prompt, messages=messages, sampling=sampling, request_id=request_id)
        metadata = build_metadata(
            user=self.user,
            app=self.app,
            api_key=self.api_key,
            interaction_id=interaction_id,
            call_index=call_index,
            kv_format=kv_format,
        )
        return request, metadata

    def _metadata(self) -> Metadata:
        return build_metadata(user=self.user, app=self.app, api_key=self.api_key)


# ---- blocking -----------------------------------------------------------------------------------------
class Stream:
    """Iterator of StreamEvents for one streaming call.

    ``interaction_id`` is set once the first event arrives (at once when one was passed in); ``attempts``
    counts how many times the call was sent. ``close()`` (or leaving a ``with`` block) cancels the call.
    """

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        request: gateway_pb2.GenerateRequest,
        metadata: Metadata,
        interaction_id: str | None,
        timeout: float,
        retry: RetryPolicy,
    ) -> None:
        self.interaction_id = interaction_id
        self.attempts = 0
        self._stub, self._request, self._metadata = stub, request, metadata
        self._timeout, self._retry = timeout, retry
        self._events = self._run()

    def _run(self) -> Generator[StreamEvent, None, None]:
        deadline = time.monotonic() + self._timeout
        retries = 0
        while True:
            self.attempts += 1
            left = max(deadline - time.monotonic(), _MIN_TIMEOUT_S)
            call: Any = self._stub.Generate(self._request, timeout=left, metadata=self._metadata)
            received = False
            try:
                for message in call:
                    if not received:
                        received = True
                        self.interaction_id = interaction_from(call.initial_metadata(), self.interaction_id)
                    yield event_from_proto(message)
                return
            except grpc.RpcError as exc:
                err = map_error(exc, self.attempts)
                # Never replay a stream that already produced output.
                delay = None if received else self._retry.delay(err, retries, deadline - time.monotonic())
                if delay is None:
                    raise err from None
                retries += 1
                time.sleep(delay)
            finally:
                call.cancel()  # no-op once the call has ended; frees the server's KV when the caller stops early

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        """Cancels the call if it is still running."""
        self._events.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(_Base):
    """Blocking client of the stageserve gateway. Thread-safe; use as a context manager or call ``close()``.

    ``Client(address, *, user, app, api_key, timeout, max_retries, backoff_s, retry_on_overload)``: user and app
    identify the tenant, ``api_key`` travels as ``authorization: Bearer``, ``timeout`` is each call's deadline.
    """

    def _open(self) -> None:
        self._channel = grpc.insecure_channel(self.address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        model: str | None = None,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        interaction_id: str | None = None,
        call_index: int = 0,
        kv_format: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> Completion | Stream:
        """Completes a text prompt (or token ids). Returns a Completion, or a Stream of events if ``stream``."""
        request, metadata = self._prepare(prompt=prompt, **_sampling_kwargs(locals()))
        return self._generate(request, metadata, interaction_id, timeout, stream)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        interaction_id: str | None = None,
        call_index: int = 0,
        kv_format: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> Completion | Stream:
        """Answers chat ``messages`` (dicts with role, content and optionally ``images``: a list of encoded
        image bytes or image file paths, placed before the text); same options and results as ``generate``."""
        request, metadata = self._prepare(messages=messages, **_sampling_kwargs(locals()))
        return self._generate(request, metadata, interaction_id, timeout, stream)

    def _generate(
        self,
        request: gateway_pb2.GenerateRequest,
        metadata: Metadata,
        interaction_id: str | None,
        timeout: float | None,
        stream: bool,
    ) -> Completion | Stream:
        events = Stream(self._stub, request, metadata, interaction_id, timeout or self.timeout, self.retry)
        if stream:
            return events
        collector = Collector()
        with events:
            for event in events:
                collector.add(event)
        return collector.completion(events.interaction_id)

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models this deployment serves, as ``(id, max_context)`` tuples."""
        deadline = time.monotonic() + (timeout or self.timeout)
        attempts = 0
        while True:
            attempts += 1
            try:
                left = max(deadline - time.monotonic(), _MIN_TIMEOUT_S)
                response = self._stub.ListModels(
                    gateway_pb2.ListModelsRequest(), timeout=left, metadata=self._metadata()
                )
                return [ModelInfo(m.id, m.max_context) for m in response.models]
            except grpc.RpcError as exc:
                err = map_error(exc, attempts)
                delay = self.retry.delay(err, attempts - 1, deadline - time.monotonic())
                if delay is None:
                    raise err from None
                time.sleep(delay)

    def close(self) -> None:
        """Closes the channel; calls still running are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---- asyncio ------------------------------------------------------------------------------------------
class AsyncStream:
    """Async iterator of StreamEvents for one streaming call; see Stream. ``aclose()`` cancels the call."""

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        request: gateway_pb2.GenerateRequest,
        metadata: Metadata,
        interaction_id: str | None,
        timeout: float,
        retry: RetryPolicy,
    ) -> None:
        self.interaction_id = interaction_id
        self.attempts = 0
        self._stub, self._request, self._metadata = stub, request, metadata
        self._timeout, self._retry = timeout, retry
        self._events = self._run()

    async def _run(self) -> AsyncGenerator[StreamEvent, None]:
        deadline = time.monotonic() + self._timeout
        retries = 0
        while True:
            self.attempts += 1
            left = max(deadline - time.monotonic(), _MIN_TIMEOUT_S)
            call: Any = self._stub.Generate(self._request, timeout=left, metadata=self._metadata)
            received = False
            try:
                async for message in call:
                    if not received:
                        received = True
                        self.interaction_id = interaction_from(await call.initial_metadata(), self.interaction_id)
                    yield event_from_proto(message)
                return
            except grpc.RpcError as exc:
                err = map_error(exc, self.attempts)
                delay = None if received else self._retry.delay(err, retries, deadline - time.monotonic())
                if delay is None:
                    raise err from None
                retries += 1
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> StreamEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Cancels the call if it is still running."""
        await self._events.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient(_Base):
    """asyncio client with Client's API (``await client.generate(...)``); ``async with`` or ``await close()``.

    The channel is created on first use, in the running event loop; use one AsyncClient per loop.
    """

    def _open(self) -> None:  # the channel itself is created lazily, inside the running loop
        self._channel: grpc.aio.Channel | None = None
        self._stub_: gateway_pb2_grpc.GatewayStub | None = None

    @property
    def _stub(self) -> gateway_pb2_grpc.GatewayStub:
        if self._stub_ is None:
            self._channel = grpc.aio.insecure_channel(self.address)
            self._stub_ = gateway_pb2_grpc.GatewayStub(self._channel)
        return self._stub_

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        model: str | None = None,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        interaction_id: str | None = None,
        call_index: int = 0,
        kv_format: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> Completion | AsyncStream:
        """Completes a text prompt (or token ids). Returns a Completion, or an AsyncStream if ``stream``."""
        request, metadata = self._prepare(prompt=prompt, **_sampling_kwargs(locals()))
        return await self._generate(request, metadata, interaction_id, timeout, stream)

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        interaction_id: str | None = None,
        call_index: int = 0,
        kv_format: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> Completion | AsyncStream:
        """Answers chat ``messages``; same options and results as ``generate``."""
        request, metadata = self._prepare(messages=messages, **_sampling_kwargs(locals()))
        return await self._generate(request, metadata, interaction_id, timeout, stream)

    async def _generate(
        self,
        request: gateway_pb2.GenerateRequest,
        metadata: Metadata,
        interaction_id: str | None,
        timeout: float | None,
        stream: bool,
    ) -> Completion | AsyncStream:
        events = AsyncStream(self._stub, request, metadata, interaction_id, timeout or self.timeout, self.retry)
        if stream:
            return events
        collector = Collector()
        async with events:
            async for event in events:
                collector.add(event)
        return collector.completion(events.interaction_id)

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models this deployment serves, as ``(id, max_context)`` tuples."""
        deadline = time.monotonic() + (timeout or self.timeout)
        attempts = 0
        while True:
            attempts += 1
            try:
                left = max(deadline - time.monotonic(), _MIN_TIMEOUT_S)
                response = await self._stub.ListModels(
                    gateway_pb2.ListModelsRequest(), timeout=left, metadata=self._metadata()
                )
                return [ModelInfo(m.id, m.max_context) for m in response.models]
            except grpc.RpcError as exc:
                err = map_error(exc, attempts)
                delay = self.retry.delay(err, attempts - 1, deadline - time.monotonic())
                if delay is None:
                    raise err from None
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Closes the channel; calls still running are cancelled."""
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub_ = None, None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


_SAMPLING_KEYS = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "interaction_id",
    "call_index",
    "kv_format",
    "request_id",
)


def _sampling_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    return {key: args[key] for key in _SAMPLING_KEYS}
