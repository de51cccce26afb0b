"""Decode shell: reserves KV for a request, installs its pages as prefill pushes them, then streams tokens."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from stageserve.engine import KVCacheFullError
from stageserve.engine.async_engine import AsyncEngine
from stageserve.kvcodec import wire
from stageserve.kvcodec.format import PageFormat
from stageserve.serving.common import metrics, tracing
from stageserve.serving.common.convert import event_to_proto, format_name, sampling_from_proto
from stageserve.serving.common.engine_stage import page_format, stage_load
from stageserve.serving.common.errors import BadRequest, Overloaded, Unavailable, abort
from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, kvpage_pb2

log = logging.getLogger("stageserve.decode")
KV_ARRIVAL_TIMEOUT_S = 120.0


@dataclass
class _Import:
    fmt: PageFormat
    spans: list[wire.Span]
    num_layers: int
    received: set[tuple[int, int]] = field(default_factory=set)
    committed: asyncio.Event = field(default_factory=asyncio.Event)

    def missing(self) -> list[tuple[int, int]]:
        return [
            (lyr, s.index) for lyr in range(self.num_layers) for s in self.spans if (lyr, s.index) not in self.received
        ]


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: AsyncEngine, replica_id: str, address: str) -> None:
        self.engine = engine
        self.replica_id = replica_id
        self.address = address
        self.imports: dict[str, _Import] = {}
        self.model = engine.engine.model_config.name
        self._registered: dict[str, asyncio.Event] = {}

    async def Generate(
        self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.TokenEvent]:
        rid = request.request_id
        self.engine.open_stream(rid)
        finished = False
        timer = metrics.engine_timer(self.model)
        try:
            pending = await self._begin(request, context)
            try:
                await asyncio.wait_for(pending.committed.wait(), KV_ARRIVAL_TIMEOUT_S)
            except TimeoutError:
                await abort(
                    context, Unavailable(f"request {rid}: KV did not arrive within {KV_ARRIVAL_TIMEOUT_S:.0f} s")
                )
            completion = 0
            async for event in self.engine.events(rid):
                completion += len(event.token_ids)
                finished = event.finished
                self._observe(timer, event.token_ids, finished, completion)
                yield event_to_proto(event, completion)
        finally:
            if not finished:  # cancelled, disconnected or failed: free the reserved or installed KV
                self.engine.abort_nowait(rid)
            self.engine.close_stream(rid)
            self.imports.pop(rid, None)
            self._registered.pop(rid, None)

    def _observe(self, timer: metrics.RequestTimer, token_ids: list[int], finished: bool, completion: int) -> None:
        now = time.perf_counter()
        timer.tokens(len(token_ids), now)
        metrics.count_generation_tokens(self.model, len(token_ids))
        if finished:
            timer.finish(now)
            tracing.set_attributes({"gen_ai.usage.output_tokens": completion})

    async def _begin(self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext) -> _Import:
        rid = request.request_id
        try:
            params = sampling_from_proto(request.sampling)
            fmt = page_format(self.engine, format_name(request.kv_format))
            ids = list(request.prompt_token_ids)
            await self.engine.call(lambda: self.engine.engine.begin_import(rid, ids, params, fmt.format))
        except KVCacheFullError as exc:
            await abort(context, Overloaded(str(exc), retry_after_s=1.0))
        except ValueError as exc:
            await abort(context, BadRequest(str(exc)))
        pending = _Import(fmt, wire.spans(fmt, len(ids)), self.engine.engine.model_config.num_hidden_layers)
        self.imports[rid] = pending
        self._registered.setdefault(rid, asyncio.Event()).set()
        return pending

    async def PushKV(
        self, request_iterator: AsyncIterator[kvpage_pb2.KVFrame], context: grpc.aio.ServicerContext
    ) -> decode_pb2.PushKVResponse:
        async for frame in request_iterator:
            pending = await self._pending(frame.request_id)
            if pending is None:
                return decode_pb2.PushKVResponse(error=f"unknown request {frame.request_id}")
            if frame.HasField("page"):
                await self._install(frame.request_id, pending, frame.page)
                continue
            missing = pending.missing()
            if missing:
                refs = [decode_pb2.PageRef(layer=lyr, page_index=i) for lyr, i in missing]
                return decode_pb2.PushKVResponse(resend=refs)
            commit = functools.partial(self.engine.engine.commit_import, frame.request_id, frame.commit.first_token_id)
            await self.engine.call(commit)
            pending.committed.set()
            return decode_pb2.PushKVResponse(committed=True)
        return decode_pb2.PushKVResponse(error="stream ended without a commit frame")

    async def _pending(self, rid: str) -> _Import | None:
        event = self._registered.setdefault(rid, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), 30.0)
        except TimeoutError:
            self._registered.pop(rid, None)
            return None
        return self.imports.get(rid)

    async def _install(self, rid: str, pending: _Import, page: kvpage_pb2.KVPageFrame) -> None:
        key = (page.layer, page.page_index)
        if page.page_index >= len(pending.spans) or page.layer >= pending.num_layers:
            log.warning("request %s: frame for unknown page %s dropped", rid, key)
            return
        if wire.checksum(page.payload) != page.crc32:
            log.warning("request %s: page %s failed its checksum; will ask for it again", rid, key)
            metrics.kv_transfer_failed("checksum")
            pending.received.discard(key)
            return
        span = pending.spans[page.page_index]
        k, v = wire.unpack(pending.fmt, span, page.payload)
        code_bytes = page.payload if span.kind == "page" else None  # installed as is in a code store
        await self.engine.call(lambda: self.engine.engine.import_kv(rid, page.layer, span.start, k, v, code_bytes))
        pending.received.add(key)

    async def GetLoad(self, request: common_pb2.LoadRequest, context: grpc.aio.ServicerContext) -> common_pb2.StageLoad:
        return stage_load(self.engine, "decode", self.replica_id, self.address)
