"""Prefill shell: runs the prompt and pushes its KV to the chosen decode replica layer by layer, as produced."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator

import grpc

from stageserve.engine.async_engine import AsyncEngine
from stageserve.kvcodec import wire
from stageserve.serving.common import metrics, tracing
from stageserve.serving.common.convert import FORMAT_IDS, format_name, sampling_from_proto
from stageserve.serving.common.engine_stage import page_format, stage_load
from stageserve.serving.common.errors import DataLoss, abort
from stageserve.serving.common.server import stage_channel
from stageserve.serving.prefill.images import EmbeddingPuller
from stageserve.v1 import common_pb2, decode_pb2_grpc, kvpage_pb2, prefill_pb2, prefill_pb2_grpc

_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):[0-9]{1,5}")
log = logging.getLogger("stageserve.prefill")
MAX_RESENDS = 2
_END = object()


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(
        self, engine: AsyncEngine, replica_id: str, address: str, link_rate_gbps: float = 0.0, layerwise: bool = True
    ) -> None:
        self.engine = engine
        self.layerwise = layerwise
        self.replica_id = replica_id
        self.address = address
        self.link_rate_gbps = link_rate_gbps
        self._channels: dict[str, decode_pb2_grpc.DecodeStub] = {}
        self.images = EmbeddingPuller(engine.engine.model_config.hidden_size)

    def _decode(self, address: str) -> decode_pb2_grpc.DecodeStub:
        if address not in self._channels:
            self._channels[address] = decode_pb2_grpc.DecodeStub(stage_channel(address))
        return self._channels[address]

    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillResponse:
        rid = request.request_id
        try:
            params = sampling_from_proto(request.sampling)
            fmt = page_format(self.engine, format_name(request.kv_format))
            if not request.decode_address:
                raise ValueError("decode_address: required")
            if not _HOST_PORT.fullmatch(request.decode_address):
                raise ValueError(f"decode_address: expected host:port, got {request.decode_address[:80]!r}")
            ids = list(request.prompt_token_ids)
        except ValueError as exc:
            await abort(context, exc)
        try:
            images = await self.images.pull(request)  # hop 4b: all of the request's embeddings, then prefill
        except Exception as exc:
            await abort(context, exc)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        sent: dict[tuple[int, int], kvpage_pb2.KVFrame] = {}
        framer = wire.LayerFramer(fmt, self.engine.engine.model_config.num_hidden_layers, len(ids))

        def sink(layer: int, start: int, k, v) -> None:  # engine thread, inside the forward pass
            for span, payload in framer.add(layer, start, k, v):
                frame = _page_frame(rid, layer, span, request.kv_format, payload)
                loop.call_soon_threadsafe(queue.put_nowait, frame)

        stub = self._decode(request.decode_address)
        forward_done = asyncio.Event()
        if self.layerwise:
            forward_done.set()
        model = self.engine.engine.model_config.name
        kv_attrs = {"stageserve.kv.format": fmt.format, "stageserve.kv.tokens": len(ids)}
        kv_span = tracing.start_span("kv_transfer", {**kv_attrs, "server.address": request.decode_address})
        with tracing.use(kv_span):  # the push (and decode's PushKV span) belongs to the kv_transfer span
            push = asyncio.ensure_future(stub.PushKV(self._frames(queue, sent, forward_done)))
        started = time.perf_counter()
        timer = metrics.engine_timer(model, started)
        first_token, cached = None, 0
        try:
            async for event in self.engine.generate(rid, ids, params, kv_sink=sink, images=images):
                if event.token_ids:
                    first_token, cached = event.token_ids[0], event.num_cached_tokens
                    timer.tokens(len(event.token_ids), time.perf_counter())
        except BaseException as exc:
            push.cancel()
            tracing.end(kv_span, exc)
            if isinstance(exc, ValueError):
                await abort(context, exc)
            raise
        forward_end = time.perf_counter()
        forward_done.set()
        assert first_token is not None
        commit = kvpage_pb2.KVFrame(
            request_id=rid, commit=kvpage_pb2.KVCommit(first_token_id=first_token, num_frames=len(sent))
        )
        queue.put_nowait(commit)
        queue.put_nowait(_END)
        try:
            response = await self._finish_push(push, stub, sent, commit, context)
        finally:
            kv_bytes = sum(len(f.page.payload) for f in sent.values())
            tracing.set_attributes({"stageserve.kv.bytes": kv_bytes, "stageserve.kv.pages": len(sent)}, kv_span)
            tracing.end(kv_span)
        done = time.perf_counter()
        metrics.count_prompt_tokens(model, len(ids))
        timer.finish(done)
        tracing.set_attributes({"gen_ai.usage.input_tokens": len(ids), "stageserve.cached_tokens": cached})
        if response.committed:
            bf16 = 2 * 2 * len(ids) * framer_bf16_token_bytes(self.engine)
            metrics.record_kv_transfer(fmt.format, kv_bytes, bf16, len(ids), done - started, done - forward_end)
        else:
            metrics.kv_transfer_failed("not_committed")
        if not response.committed:
            await abort(context, DataLoss(f"request {rid}: KV transfer failed: {response.error or 'pages lost'}"))
        return prefill_pb2.PrefillResponse(
            first_token_id=first_token,
            num_cached_tokens=cached,
            kv_bytes=sum(len(f.page.payload) for f in sent.values()),
            kv_frames=len(sent),
            prefill_seconds=forward_end - started,
            exposed_transfer_seconds=done - forward_end,
            kv_format=FORMAT_IDS[fmt.format],
        )

    async def _finish_push(self, push, stub, sent, commit, context):  # type: ignore[no-untyped-def]
        try:
            response = await push
            for _ in range(MAX_RESENDS):
                if response.committed or not response.resend:
                    return response
                log.warning("%s: decode asked for %d pages again", commit.request_id, len(response.resend))
                metrics.kv_transfer_failed("resend", len(response.resend))
                again = [sent[(r.layer, r.page_index)] for r in response.resend if (r.layer, r.page_index) in sent]
                response = await stub.PushKV(_iterate([*again, commit]))
            return response
        except grpc.aio.AioRpcError as exc:
            metrics.kv_transfer_failed("rpc_error")
            await abort(context, exc)

    async def _frames(
        self, queue: asyncio.Queue[object], sent: dict[tuple[int, int], kvpage_pb2.KVFrame], start: asyncio.Event
    ) -> AsyncIterator[kvpage_pb2.KVFrame]:
        """Frames as the forward pass produces them (or, when not layer-wise, only once it has ended)."""
        await start.wait()
        while True:
            frame = await queue.get()
            if frame is _END:
                return
            assert isinstance(frame, kvpage_pb2.KVFrame)
            if frame.HasField("page"):
                sent[(frame.page.layer, frame.page.page_index)] = frame
                if self.link_rate_gbps > 0:  # emulate a slower prefill->decode link
                    await asyncio.sleep(len(frame.page.payload) * 8 / (self.link_rate_gbps * 1e9))
            yield frame

    async def GetLoad(self, request: common_pb2.LoadRequest, context: grpc.aio.ServicerContext) -> common_pb2.StageLoad:
        return stage_load(self.engine, "prefill", self.replica_id, self.address)


def framer_bf16_token_bytes(engine: AsyncEngine) -> int:
    """K (or V) elements of one token over all layers: times 2 (K and V) times 2 bytes is its bf16 size."""
    mc = engine.engine.model_config
    return mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim


def _page_frame(rid: str, layer: int, span: wire.Span, kv_format: int, payload: bytes) -> kvpage_pb2.KVFrame:
    page = kvpage_pb2.KVPageFrame(
        layer=layer,
        page_index=span.index,
        token_start=span.start,
        num_tokens=span.length,
        format=kv_format,
        crc32=wire.checksum(payload),
        payload=payload,
    )
    return kvpage_pb2.KVFrame(request_id=rid, page=page)


async def _iterate(frames: list[kvpage_pb2.KVFrame]) -> AsyncIterator[kvpage_pb2.KVFrame]:
    for frame in frames:
        yield frame
