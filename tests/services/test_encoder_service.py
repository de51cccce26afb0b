"""The encoder service over real gRPC on loopback: handles, batching, pull-once, TTL, load, bad images."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from stageserve.models.multimodal import MultimodalConfig, encode_images, estimate_image_tokens
from stageserve.models.vision import VisionConfig, VisionTower
from stageserve.serving.encoder.servicer import EncoderServicer
from stageserve.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc, gateway_pb2

MM = MultimodalConfig(
    VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
    image_token_id=16,
)
HIDDEN = 96


def image(w: int, h: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG")
    return out.getvalue()


class CountingTower(VisionTower):
    """The real seeded tower; counts forward passes (batches)."""

    calls: int = 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(pixels)


async def _with_encoder(body, ttl_s: float = 60.0):
    tower = CountingTower.seeded(MM.vision, HIDDEN)
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    servicer = EncoderServicer("encoder-0", f"127.0.0.1:{port}", "test", tower, MM, max_batch_tiles=64, ttl_s=ttl_s)
    encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(servicer, encoder_pb2_grpc.EncoderStub(channel), tower)
    finally:
        await servicer.stop()
        await server.stop(None)


async def _fetch(stub, handle: encoder_pb2.EmbeddingHandle) -> torch.Tensor:
    chunks = [c async for c in stub.FetchEmbeddings(encoder_pb2.FetchEmbeddingsRequest(handle=handle.handle))]
    assert {c.dtype for c in chunks} == {"float32"} and {c.hidden_size for c in chunks} == {HIDDEN}
    rows = np.frombuffer(b"".join(c.data for c in chunks), dtype="<f4").reshape(-1, HIDDEN)
    return torch.from_numpy(rows.copy())


def _request(images: list[bytes]) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(request_id="r", images=[gateway_pb2.ImageInput(data=d) for d in images])


def test_encode_batches_reports_load_and_streams_each_embedding_once():
    images = [image(20, 20, 1), image(70, 40, 2), image(32, 32, 3)]

    async def body(servicer, stub, tower):
        # Two requests queued before the batcher runs: one vision forward pass encodes both.
        first, second = await asyncio.gather(stub.Encode(_request(images[:2])), stub.Encode(_request(images[2:])))
        handles = [*first.handles, *second.handles]
        assert [h.num_tokens for h in handles] == [
            estimate_image_tokens(*s, MM) for s in ((20, 20), (70, 40), (32, 32))
        ]
        load = await stub.GetLoad(common_pb2.LoadRequest())
        assert load.pending_image_tokens == sum(h.num_tokens for h in handles)
        calls = type(tower).calls
        servicer.start()
        got = await asyncio.gather(*(_fetch(stub, h) for h in handles))
        assert type(tower).calls == calls + 1
        expected = encode_images(VisionTower.seeded(MM.vision, HIDDEN), images, MM)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
        assert (await stub.GetLoad(common_pb2.LoadRequest())).pending_image_tokens == 0
        with pytest.raises(grpc.aio.AioRpcError) as info:  # pulled once, then dropped
            await _fetch(stub, handles[0])
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(_with_encoder(body))


def test_unfetched_embeddings_expire_after_the_ttl():
    async def body(servicer, stub, tower):
        servicer.start()
        (handle,) = (await stub.Encode(_request([image(10, 10, 4)]))).handles
        await asyncio.wait_for(asyncio.shield(servicer.entries[handle.handle].done), 60)
        await asyncio.sleep(0.6)  # the sweeper runs every ttl/4
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _fetch(stub, handle)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in info.value.details()

    asyncio.run(_with_encoder(body, ttl_s=0.2))


def test_a_bad_image_fails_the_call_and_queues_nothing():
    async def body(servicer, stub, tower):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Encode(_request([image(10, 10, 5), b"\x89PNG\r\n\x1a\n broken"]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "images[1]" in info.value.details()
        assert not servicer.entries and servicer.pending_image_tokens == 0
        too_many = _request([image(4, 4, i) for i in range(MM.limits.max_images + 1)])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Encode(too_many)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in info.value.details()
        assert (await stub.Encode(encoder_pb2.EncodeRequest(request_id="text-only"))).handles == []

    asyncio.run(_with_encoder(body))
