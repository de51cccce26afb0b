"""The gateway's request path, shared by its gRPC and OpenAI HTTP front ends.

admit (throttler) -> pick prefill and decode replicas (least pending tokens) -> negotiate the KV format ->
open the decode stream (decode reserves KV) -> ask prefill to run and push KV to that decode replica ->
relay decode's token events -> release. The gateway never touches KV bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from stageserve.models.config import ModelConfig
from stageserve.policy.routing.kv_format import negotiate
from stageserve.serving.common.config import StageServeConfig
from stageserve.serving.common.convert import FORMAT_IDS, sampling_to_proto
from stageserve.serving.common.discovery import Discovery
from stageserve.serving.common.errors import Overloaded, Unavailable, classify
from stageserve.serving.common.multimodal import stage_multimodal_config
from stageserve.serving.common.server import stage_channel
from stageserve.serving.gateway.http import GenerateDelta, HttpGenerateRequest
from stageserve.serving.gateway.identity import ApiKeys
from stageserve.serving.gateway.images import EncoderPool, check_images, read_image_url, tokenize_chat_images
from stageserve.serving.gateway.limits import check_tokens
from stageserve.serving.gateway.migration import attempt_timeout, core_hook
from stageserve.serving.gateway.rediscover import rediscover, throttler_target
from stageserve.serving.gateway.replicas import ReplicaSet
from stageserve.serving.gateway.throttler_fallback import THROTTLER_DOWN, LocalTenantLimiter
from stageserve.serving.gateway.throttling import TokenProgress, expected_counts, forward_loads
from stageserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    throttler_pb2,
    throttler_pb2_grpc,
)

log = logging.getLogger("stageserve.gateway")


class GatewayCore:
    def __init__(self, config: StageServeConfig, tokenizer: Any, model: ModelConfig) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = model.name
        self.max_context = model.max_position_embeddings
        self.discovery = Discovery(config)  # static addresses, or re-resolved DNS (common/discovery.py)
        self.prefill = ReplicaSet("prefill", self.discovery.addresses("prefill"), prefill_pb2_grpc.PrefillStub)
        self.decode = ReplicaSet("decode", self.discovery.addresses("decode"), decode_pb2_grpc.DecodeStub)
        self.throttler_address = throttler_target(config, self.discovery)
        self.throttler = throttler_pb2_grpc.ThrottlerStub(stage_channel(self.throttler_address))
        self._poller: asyncio.Task[None] | None = None
        self.migrator = core_hook(self)  # re-dispatch after stage failures; .stats: counters for metrics
        self.fallback = LocalTenantLimiter(config.gateway.local_tenant_max_inflight)
        self.api_keys = ApiKeys(config.gateway.api_keys)  # per-tenant keys (gateway/identity.py)
        self.mm = stage_multimodal_config(config, tokenizer)
        self.encoders = EncoderPool(config, self.mm)  # hop 3, only for requests with images (gateway/images.py)

    async def start(self) -> None:
        await rediscover(self, time.monotonic())
        await asyncio.gather(self.prefill.refresh(), self.decode.refresh(), self.encoders.refresh())
        self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.gateway.load_poll_interval_s)
            await rediscover(self, time.monotonic())
            await asyncio.gather(self.prefill.refresh(), self.decode.refresh(), self.encoders.refresh())
            if self.config.gateway.report_loads:
                await forward_loads(self.throttler, (self.prefill, self.decode))

    # ---- tokenization ----------------------------------------------------------------------------
    def tokenize_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not messages:
            raise ValueError("messages: must not be empty")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise ValueError(f"messages[{i}].role: unknown role {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content: must be text")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def tokenize_chat_images(self, messages: list[dict[str, Any]], images: list[bytes]) -> tuple[list[int], list[int]]:
        """Chat contents hold IMAGE_MARKERs: -> ids with placeholder runs, each image's first position."""
        return tokenize_chat_images(self.tokenizer, self.mm, messages, images)

    async def read_image_url(self, url: str, field: str) -> bytes:
        return await read_image_url(url, field, self.config)

    # ---- the request path ------------------------------------------------------------------------
    async def generate(self, request: HttpGenerateRequest) -> AsyncIterator[GenerateDelta]:
        ids = request.prompt_token_ids
        if not ids:
            raise ValueError("prompt: must not be empty")
        check_tokens(len(ids), request.params.max_tokens, self.config.gateway)  # gateway.max_*_tokens -> 400
        if len(ids) + request.params.max_tokens > self.max_context:
            raise ValueError(
                f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({request.params.max_tokens}) exceeds the "
                f"model's context of {self.max_context} tokens"
            )
        await self._admit(request)
        progress = TokenProgress(self.throttler, request)  # ReportTokens as decode progresses
        try:
            async for delta in self.migrator.run(request, self._run):
                progress.add(len(delta.token_ids), delta.completion_tokens)
                yield delta
        finally:
            counts = progress.counts()
            try:
                if not self.fallback.release(request.request_id):  # admitted locally: the throttler never saw it
                    await self.throttler.Release(
                        throttler_pb2.ReleaseRequest(request_id=request.request_id, counts=counts), timeout=2.0
                    )
            except grpc.aio.AioRpcError as exc:
                log.warning("throttler release failed for %s: %s", request.request_id, exc.code().name)

    async def _admit(self, request: HttpGenerateRequest) -> None:
        t = request.tenant
        admit = throttler_pb2.AdmitRequest(
            request_id=request.request_id,
            tenant=common_pb2.TenantKey(
                user=t.user, app=t.app, interaction_id=t.interaction_id, call_index=t.call_index
            ),
            expected=expected_counts(request),
        )
        try:
            answer = await self.throttler.Admit(admit, timeout=5.0)
            if answer.decision == throttler_pb2.AdmitResponse.QUEUED:
                answer = await self.throttler.AwaitAdmission(throttler_pb2.AwaitRequest(request_id=request.request_id))
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in THROTTLER_DOWN:  # the throttler answered (e.g. INVALID_ARGUMENT): pass it on
                raise classify(exc) from exc
            if self.config.gateway.throttler_failure_mode == "fail-closed":
                raise Unavailable(f"throttler unreachable: {exc.code().name}") from exc
            self.fallback.admit(request.request_id, (request.tenant.user, request.tenant.app), exc.code().name)
            return
        if answer.decision != throttler_pb2.AdmitResponse.ADMITTED:
            raise Overloaded(answer.reason or "throttled", retry_after_s=max(answer.retry_after_s, 1.0))

    async def _run(self, request: HttpGenerateRequest) -> AsyncIterator[GenerateDelta]:
        ids, rid = request.prompt_token_ids, request.request_id
        handles = []  # hop 3: images only; text-only requests skip the encoder
        if request.images:
            handles = await self.encoders.encode(rid, list(request.images), check_images(list(request.images), self.mm))
        decode_address = self.decode.pick(len(ids) + request.params.max_tokens)
        prefill_address = self.prefill.pick(len(ids))
        fmt = negotiate(
            request.kv_format or self.config.kv_format,
            self.prefill.formats[prefill_address] or {"bf16"},
            self.decode.formats[decode_address] or {"bf16"},
            self.config.gateway.link_gbps,
        )
        sampling = sampling_to_proto(request.params)
        timeout = attempt_timeout(self.config.gateway.request_timeout_s)
        call = self.decode.stubs[decode_address].Generate(
            decode_pb2.DecodeRequest(
                request_id=rid, prompt_token_ids=ids, sampling=sampling, kv_format=FORMAT_IDS[fmt]
            ),
            timeout=timeout,
        )
        prefill = asyncio.ensure_future(
            self.prefill.stubs[prefill_address].Prefill(
                prefill_pb2.PrefillRequest(
                    request_id=rid,
                    prompt_token_ids=ids,
                    sampling=sampling,
                    decode_address=decode_address,
                    kv_format=FORMAT_IDS[fmt],
                    images=handles,
                    image_positions=request.image_positions,
                ),
                timeout=timeout,
            )
        )
        finished = False
        try:
            async for event in _race(call, prefill):
                finished = event.finished
                yield GenerateDelta(
                    text=event.text,
                    token_ids=list(event.token_ids),
                    finished=event.finished,
                    finish_reason=event.finish_reason or None,
                    prompt_tokens=len(ids),
                    completion_tokens=event.usage.completion_tokens if event.finished else 0,
                    cached_tokens=_cached(prefill) if event.finished else 0,
                )
        except grpc.aio.AioRpcError as exc:
            raise classify(exc) from exc
        finally:
            if not finished:  # client gone or a stage failed: cancel both hops so they free KV
                call.cancel()
                prefill.cancel()


def _cached(prefill: asyncio.Future[prefill_pb2.PrefillResponse]) -> int:
    if prefill.done() and not prefill.cancelled() and prefill.exception() is None:
        return prefill.result().num_cached_tokens
    return 0


async def _race(call: Any, prefill: asyncio.Future[Any]) -> AsyncIterator[common_pb2.TokenEvent]:
    """Decode's events; if prefill fails first, its error wins (decode would only time out waiting for KV)."""
    reader = call.__aiter__()
    read: asyncio.Future[Any] = asyncio.ensure_future(reader.__anext__())
    try:
        while True:
            waiting = {read} if prefill.done() else {read, prefill}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if prefill in done and prefill.exception() is not None:
                raise prefill.exception()  # type: ignore[misc]
            if read in done:
                try:
                    event = read.result()
                except StopAsyncIteration:
                    return
                yield event
                read = asyncio.ensure_future(reader.__anext__())
    finally:
        read.cancel()


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"
