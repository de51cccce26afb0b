"""Drives an LLMEngine on its own thread so asyncio services can stream from it.

The engine is single-threaded by design: every call into it (adding, aborting, importing KV, reading load)
runs on the engine thread, between steps. Asyncio callers submit work with ``call()`` and read a request's
token events from ``stream()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from stageserve.core.sampling import SamplingParams
from stageserve.engine.attention import KVSink
from stageserve.engine.engine import LLMEngine
from stageserve.engine.model_runner import ImageEmbeds
from stageserve.engine.outputs import TokenEvent

T = TypeVar("T")


@dataclass(frozen=True)
class EngineLoad:
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    pending_tokens: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._wake = threading.Condition()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenEvent]]] = {}
        self._stopped = False
        self.load = EngineLoad(0, 0, 0.0, 0)
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # ---- asyncio side ----------------------------------------------------------------------------
    async def call(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on the engine thread between steps; returns its result or raises its exception."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._wake:
            if self._stopped:
                raise RuntimeError("engine is shut down")
            self._commands.append((fn, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    def open_stream(self, request_id: str) -> None:
        """Registers a request's event queue; call before the request can produce events."""
        self._streams[request_id] = (asyncio.get_running_loop(), asyncio.Queue())

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def events(self, request_id: str) -> AsyncIterator[TokenEvent]:
        """Yields the request's events until it finishes. Leaving early (cancellation, disconnect) aborts it
        and frees its KV blocks."""
        _, queue = self._streams[request_id]
        finished = False
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort_nowait(request_id)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kv_sink: KVSink | None = None,
        images: list[ImageEmbeds] | None = None,
    ) -> AsyncIterator[TokenEvent]:
        self.open_stream(request_id)
        try:
            await self.call(
                lambda: self.engine.add_request(request_id, prompt_token_ids, params, kv_sink=kv_sink, images=images)
            )
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        async for event in self.events(request_id):
            yield event

    def abort_nowait(self, request_id: str) -> None:
        """Queues an abort (frees the request's KV) without waiting: safe inside a cancelled task."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._wake:
            if not self._stopped:
                self._commands.append((lambda: self.engine.abort_request(request_id), future))
                self._wake.notify()

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # ---- engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self._stopped and not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=1.0)
                if self._stopped:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for fn, future in commands:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # handed to the awaiting caller
                        future.set_exception(exc)
            if self.engine.has_unfinished_requests():
                for event in self.engine.step():
                    self._dispatch(event)
            self._refresh_load()

    def _dispatch(self, event: TokenEvent) -> None:
        target = self._streams.get(event.request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, event)

    def _refresh_load(self) -> None:
        engine = self.engine
        pending = sum(s.num_uncomputed_tokens for s in engine.scheduler.waiting)
        pending += sum(s.num_uncomputed_tokens for s in engine.scheduler.running)
        self.load = EngineLoad(engine.num_waiting, engine.num_running, engine.blocks.usage, pending)
