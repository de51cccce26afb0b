"""Hop 4b: prefill pulls a request's image embeddings from the encoders that hold them (many-to-one)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import torch

from stageserve.engine.model_runner import ImageEmbeds
from stageserve.models.multimodal import embedding_key
from stageserve.serving.common.errors import BadRequest, classify
from stageserve.serving.common.server import stage_channel
from stageserve.v1 import encoder_pb2, encoder_pb2_grpc, prefill_pb2


class EmbeddingPuller:
    """One channel per encoder replica; ``pull`` fetches every image of a request concurrently."""

    def __init__(self, hidden_size: int, timeout_s: float = 300.0) -> None:
        self.hidden_size = hidden_size
        self.timeout_s = timeout_s
        self._stubs: dict[str, encoder_pb2_grpc.EncoderStub] = {}

    def _stub(self, address: str) -> encoder_pb2_grpc.EncoderStub:
        if address not in self._stubs:
            self._stubs[address] = encoder_pb2_grpc.EncoderStub(stage_channel(address))
        return self._stubs[address]

    async def pull(self, request: prefill_pb2.PrefillRequest) -> list[ImageEmbeds]:
        """The request's images placed at ``image_positions``; raises BadRequest for inconsistent input."""
        handles, positions = list(request.images), list(request.image_positions)
        if not handles:
            return []
        if len(positions) != len(handles):
            raise BadRequest(
                f"image_positions: {len(positions)} positions for {len(handles)} images", field="image_positions"
            )
        n = len(request.prompt_token_ids)
        for i, (h, p) in enumerate(zip(handles, positions, strict=True)):
            if p + h.num_tokens > n:
                raise BadRequest(f"image_positions[{i}]: image tokens leave the prompt", field="image_positions")
        tensors = await asyncio.gather(*(self._fetch(h) for h in handles))
        return [ImageEmbeds(p, t, embedding_key(t)) for p, t in zip(positions, tensors, strict=True)]

    async def _fetch(self, handle: encoder_pb2.EmbeddingHandle) -> torch.Tensor:
        parts: list[bytes] = []
        try:
            stream = self._stub(handle.encoder_address).FetchEmbeddings(
                encoder_pb2.FetchEmbeddingsRequest(handle=handle.handle), timeout=self.timeout_s
            )
            async for chunk in stream:
                if chunk.dtype != "float32" or chunk.hidden_size != self.hidden_size:
                    raise BadRequest(f"handle {handle.handle}: {chunk.dtype} x {chunk.hidden_size} embeddings")
                parts.append(chunk.data)
        except grpc.aio.AioRpcError as exc:
            raise classify(exc) from exc
        rows = np.frombuffer(b"".join(parts), dtype="<f4").reshape(-1, self.hidden_size)
        if rows.shape[0] != handle.num_tokens:
            raise BadRequest(f"handle {handle.handle}: {rows.shape[0]} rows, expected {handle.num_tokens}")
        return torch.from_numpy(rows.copy())
