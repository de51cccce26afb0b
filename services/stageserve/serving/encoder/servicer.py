"""Encoder shell. This deployment has no vision tower yet: it serves text-only requests (no images to
encode) and reports zero pending image tokens; a request with images gets a clear INVALID_ARGUMENT."""

from __future__ import annotations

import grpc

from stageserve.serving.common.errors import BadRequest, abort
from stageserve.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, replica_id: str, address: str, model: str) -> None:
        self.replica_id = replica_id
        self.address = address
        self.model = model

    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        if request.images:
            await abort(context, BadRequest("images: this deployment's model has no vision tower", field="images"))
        return encoder_pb2.EncodeResponse()

    async def FetchEmbeddings(self, request: encoder_pb2.FetchEmbeddingsRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await abort(context, BadRequest(f"handle: unknown embedding handle {request.handle!r}", field="handle"))
        yield encoder_pb2.EmbeddingChunk()  # unreachable: abort raises

    async def GetLoad(self, request: common_pb2.LoadRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        return common_pb2.StageLoad(
            stage="encoder", replica_id=self.replica_id, address=self.address, pending_image_tokens=0, model=self.model
        )
