"""Images at the gateway: reading ``image_url`` parts, tokenizing chats with images, and hop 3 (Encode),
each image routed to the encoder replica with the least pending image tokens (policy/routing/images.py).

Text-only requests never reach this module's ``EncoderPool.encode``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

import grpc

from stageserve.models.multimodal import (
    ImageError,
    MultimodalConfig,
    chat_with_images,
    estimate_image_tokens,
    marked_content,
    probe_image,
)
from stageserve.policy.routing.images import assign_least_pending, assign_round_robin
from stageserve.serving.common.config import StageServeConfig
from stageserve.serving.common.discovery import stage_addresses
from stageserve.serving.common.errors import BadRequest, Unavailable, classify
from stageserve.serving.gateway.replicas import ReplicaSet
from stageserve.v1 import encoder_pb2, encoder_pb2_grpc, gateway_pb2


# ---- image sources ----------------------------------------------------------------------------------------
async def read_image_url(url: str, field: str, config: StageServeConfig) -> bytes:
    """Bytes of a ``data:`` URL, or of an http(s) URL when ``gateway.allow_remote_images`` (size/time capped)."""
    max_bytes = config.encoder.max_image_bytes
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise BadRequest(f"{field}: data URLs must be base64 (data:image/png;base64,...)", field=field)
        if len(payload) > max_bytes * 4 // 3 + 4:
            raise BadRequest(f"{field}: image is larger than {max_bytes} bytes", field=field)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{field}: invalid base64 in the data URL", field=field) from None
    if url.startswith(("http://", "https://")):
        if not config.gateway.allow_remote_images:
            raise BadRequest(
                f"{field}: remote image URLs are disabled on this server; send the image inline as a "
                "base64 data: URL (or set gateway.allow_remote_images)",
                field=field,
            )
        return await _fetch_remote(url, field, max_bytes, config.gateway.remote_image_timeout_s)
    raise BadRequest(f"{field}: image_url must be a data: URL or an http(s) URL", field=field)


async def _fetch_remote(url: str, field: str, max_bytes: int, timeout_s: float) -> bytes:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise BadRequest(f"{field}: fetching the image returned HTTP {response.status_code}", field=field)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise BadRequest(f"{field}: image is larger than {max_bytes} bytes", field=field)
                return bytes(data)
    except httpx.HTTPError as exc:
        raise BadRequest(f"{field}: cannot fetch the image: {type(exc).__name__}", field=field) from None


def image_url_of(part: Any) -> str | None:
    """The URL of an OpenAI image content part (``image_url: {url}``, or a bare string)."""
    value = getattr(part, "image_url", None)
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) else None


# ---- prompts ------------------------------------------------------------------------------------------------
def tokenize_chat_images(
    tokenizer: Any, mm: MultimodalConfig, messages: list[dict[str, Any]], images: list[bytes]
) -> tuple[list[int], list[int]]:
    """Ids (each IMAGE_MARKER in a content expanded to its image's placeholder run) and image positions."""
    check_images(images, mm)
    try:
        ids, positions, _ = chat_with_images(tokenizer, messages, images, mm)
    except ValueError as exc:
        raise BadRequest(f"messages: {exc}", field="messages") from None
    return ids, positions


def check_images(images: list[bytes], mm: MultimodalConfig, field: str = "images") -> list[int]:
    """Image-token count of each image (from its header); BadRequest naming the image otherwise."""
    if len(images) > mm.limits.max_images:
        raise BadRequest(
            f"{field}: {len(images)} images, more than the limit of {mm.limits.max_images} per request", field=field
        )
    counts = []
    for i, data in enumerate(images):
        try:
            info = probe_image(data, mm.limits)
        except ImageError as exc:
            raise BadRequest(f"{field}[{i}]: {exc}", field=f"{field}[{i}]") from None
        counts.append(estimate_image_tokens(info.width, info.height, mm))
    return counts


def grpc_chat_messages(messages: Any) -> tuple[list[dict[str, Any]], list[bytes]]:
    """gRPC ChatMessages -> template messages (each image a marker before the text) and the image bytes."""
    out, images = [], []
    for m in messages:
        out.append({"role": m.role, "content": marked_content(len(m.images), m.content)})
        images.extend(img.data for img in m.images)
    return out, images


# ---- hop 3 ------------------------------------------------------------------------------------------------
class EncoderPool:
    """The encoder replicas, their pending image tokens, and Encode fan-out."""

    def __init__(self, config: StageServeConfig, mm: MultimodalConfig) -> None:
        self.mm = mm
        self.routing = config.gateway.image_routing
        self.timeout_s = config.gateway.request_timeout_s
        self.replicas = ReplicaSet(
            "encoder",
            stage_addresses(config, "encoder"),  # dns discovery: filled by gateway/rediscover.py
            encoder_pb2_grpc.EncoderStub,
            pending_of=lambda load: int(load.pending_image_tokens),
        )
        self._turn = 0

    @property
    def stubs(self) -> dict[str, Any]:
        return self.replicas.stubs

    def sync(self, addresses: list[str]) -> None:
        self.replicas.sync(addresses)

    async def refresh(self) -> None:
        await self.replicas.refresh()

    def assign(self, counts: list[int]) -> list[str]:
        live = self.replicas.healthy()
        try:
            if self.routing == "round-robin":
                picks = assign_round_robin(len(counts), live, self._turn)
                self._turn += len(counts)
            else:
                picks = assign_least_pending(counts, {a: self.replicas.loads[a].pending_tokens for a in live})
        except LookupError:
            raise Unavailable("no healthy encoder replica") from None
        for address, n in zip(picks, counts, strict=True):  # count them locally until the next report
            self.replicas.add_pending(address, n)
        return picks

    async def encode(
        self, request_id: str, images: list[bytes], counts: list[int]
    ) -> list[encoder_pb2.EmbeddingHandle]:
        """One Encode per chosen replica (its share of the images); handles come back in image order."""
        picks = self.assign(counts)
        groups: dict[str, list[int]] = {}
        for i, address in enumerate(picks):
            groups.setdefault(address, []).append(i)
        calls = [
            self.stubs[a].Encode(
                encoder_pb2.EncodeRequest(
                    request_id=request_id, images=[gateway_pb2.ImageInput(data=images[i]) for i in idx]
                ),
                timeout=self.timeout_s,
            )
            for a, idx in groups.items()
        ]
        try:
            answers = await asyncio.gather(*calls)
        except grpc.aio.AioRpcError as exc:
            for call in calls:
                call.cancel()
            raise classify(exc) from exc
        handles: list[encoder_pb2.EmbeddingHandle | None] = [None] * len(images)
        for (address, idx), answer in zip(groups.items(), answers, strict=True):
            for i, handle in zip(idx, answer.handles, strict=True):
                handle.encoder_address = address  # where prefill reaches it (the encoder may bind 0.0.0.0)
                if handle.num_tokens != counts[i]:
                    raise RuntimeError(f"image {i}: encoder made {handle.num_tokens} tokens, estimate {counts[i]}")
                handles[i] = handle
        return [h for h in handles if h is not None]
