"""Encoder shell (hops 3 and 4b): images in, handles out; embeddings stay here until prefill pulls them.

``Encode`` decodes and tiles each image (Pillow, on a worker thread; a bad image fails the whole call with
INVALID_ARGUMENT naming ``images[i]`` before anything is queued), registers one handle per image and queues
its tiles. One batcher runs the vision tower over up to ``max_batch_tiles`` queued tiles at a time and
completes the handles. ``FetchEmbeddings`` waits until its handle is encoded, streams the rows and drops
them; handles nobody fetches expire after ``embedding_ttl_s``. Load = image tokens queued or being encoded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc
import torch

from stageserve.models.multimodal import ImageError, MultimodalConfig, preprocess, split_tiles
from stageserve.models.vision import VisionTower
from stageserve.serving.common import metrics
from stageserve.serving.common.errors import BadRequest, ModelNotFound, Timeout, abort
from stageserve.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

log = logging.getLogger("stageserve.encoder")
CHUNK_BYTES = 1 << 20
FETCH_WAIT_S = 300.0


@dataclass
class _Entry:
    num_tokens: int
    created: float
    done: asyncio.Future[torch.Tensor]


@dataclass
class _Job:
    handles: list[str]
    pixels: list[torch.Tensor]
    tokens: int
    queued_at: float
    tiles: int = field(init=False)

    def __post_init__(self) -> None:
        self.tiles = sum(p.shape[0] for p in self.pixels)


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(
        self,
        replica_id: str,
        address: str,
        model: str,
        tower: VisionTower,
        mm: MultimodalConfig,
        max_batch_tiles: int = 32,
        ttl_s: float = 120.0,
    ) -> None:
        self.replica_id = replica_id
        self.address = address
        self.model = model
        self.tower = tower
        self.mm = mm
        self.max_batch_tiles = max_batch_tiles
        self.ttl_s = ttl_s
        self.entries: dict[str, _Entry] = {}
        self.pending_image_tokens = 0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._prep = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="preprocess")
        self._vit = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vision")
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._batcher()), asyncio.create_task(self._sweeper())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._prep.shutdown(wait=False, cancel_futures=True)
        self._vit.shutdown(wait=False, cancel_futures=True)

    # ---- rpcs ------------------------------------------------------------------------------------
    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        if not request.images:
            return encoder_pb2.EncodeResponse()
        try:
            if len(request.images) > self.mm.limits.max_images:
                raise BadRequest(
                    f"images: {len(request.images)} images, more than the limit of {self.mm.limits.max_images}",
                    field="images",
                )
            loop = asyncio.get_running_loop()
            pixels = await asyncio.gather(
                *(
                    loop.run_in_executor(self._prep, _prepare, i, img.data, self.mm)
                    for i, img in enumerate(request.images)
                )
            )
        except Exception as exc:
            await abort(context, exc)
        tpt = self.mm.vision.tokens_per_tile
        now = time.monotonic()
        handles = [f"{self.replica_id}/{uuid.uuid4().hex}" for _ in pixels]
        counts = [p.shape[0] * tpt for p in pixels]
        loop = asyncio.get_running_loop()
        for handle, n in zip(handles, counts, strict=True):
            self.entries[handle] = _Entry(n, now, loop.create_future())
        self.pending_image_tokens += sum(counts)
        metrics.ENCODER_PENDING.set(self.pending_image_tokens)
        self._queue.put_nowait(_Job(handles, list(pixels), sum(counts), now))
        return encoder_pb2.EncodeResponse(
            handles=[
                encoder_pb2.EmbeddingHandle(handle=h, encoder_address=self.address, num_tokens=n)
                for h, n in zip(handles, counts, strict=True)
            ]
        )

    async def FetchEmbeddings(self, request: encoder_pb2.FetchEmbeddingsRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        entry = self.entries.get(request.handle)
        if entry is None:
            await abort(context, ModelNotFound(f"handle: unknown or expired embedding handle {request.handle!r}"))
            return
        try:
            embeds = await asyncio.wait_for(asyncio.shield(entry.done), FETCH_WAIT_S)
        except TimeoutError:
            await abort(context, Timeout(f"handle {request.handle!r}: not encoded within {FETCH_WAIT_S:.0f} s"))
            return
        self.entries.pop(request.handle, None)  # pulled once
        data = embeds.contiguous().numpy().tobytes()
        n, hidden = embeds.shape
        rows = max(1, CHUNK_BYTES // (hidden * 4))
        for start in range(0, n, rows):
            chunk = data[start * hidden * 4 : min(n, start + rows) * hidden * 4]
            yield encoder_pb2.EmbeddingChunk(
                handle=request.handle, num_tokens=n, hidden_size=hidden, dtype="float32", data=chunk
            )

    async def GetLoad(self, request: common_pb2.LoadRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        return common_pb2.StageLoad(
            stage="encoder",
            replica_id=self.replica_id,
            address=self.address,
            num_waiting=self._queue.qsize(),
            pending_image_tokens=self.pending_image_tokens,
            model=self.model,
        )

    # ---- batching ------------------------------------------------------------------------------------
    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            tiles = jobs[0].tiles
            while not self._queue.empty() and tiles + self._queue._queue[0].tiles <= self.max_batch_tiles:  # type: ignore[attr-defined]
                job = self._queue.get_nowait()
                jobs.append(job)
                tiles += job.tiles
            pixels = [p for job in jobs for p in job.pixels]
            try:
                features = await loop.run_in_executor(self._vit, self.tower, torch.cat(pixels))
                results = split_tiles(features.float(), [p.shape[0] for p in pixels])
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its handles, not the service
                log.exception("vision forward failed")
                results = [exc] * len(pixels)  # type: ignore[list-item]
            now = time.monotonic()
            it = iter(results)
            for job in jobs:
                for handle in job.handles:
                    self._complete(handle, next(it))
                self.pending_image_tokens -= job.tokens
                metrics.record_encode(job.tokens, now - job.queued_at)
            metrics.ENCODER_PENDING.set(self.pending_image_tokens)

    def _complete(self, handle: str, result: torch.Tensor | BaseException) -> None:
        entry = self.entries.get(handle)
        if entry is None or entry.done.done():
            return
        if isinstance(result, BaseException):
            entry.done.set_exception(result)
        else:
            entry.done.set_result(result)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, min(self.ttl_s / 4, 5.0)))
            self.expire(time.monotonic())

    def expire(self, now: float) -> int:
        """Drops encoded embeddings older than the TTL that nobody fetched; returns how many."""
        old = [h for h, e in self.entries.items() if e.done.done() and now - e.created > self.ttl_s]
        for handle in old:
            entry = self.entries.pop(handle)
            if entry.done.exception() is None:
                log.info("embedding %s expired unfetched", handle)
        return len(old)


def _prepare(index: int, data: bytes, mm: MultimodalConfig) -> torch.Tensor:
    try:
        return preprocess(data, mm)
    except ImageError as exc:
        raise BadRequest(f"images[{index}]: {exc}", field=f"images[{index}]") from None
