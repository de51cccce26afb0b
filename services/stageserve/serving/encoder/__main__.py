"""``python -m stageserve.serving.encoder --config FILE --replica N``."""

from __future__ import annotations

import asyncio

import torch

from stageserve.models.loader import load_tokenizer, read_model_config
from stageserve.models.multimodal import build_vision_tower
from stageserve.serving.common import observe
from stageserve.serving.common.multimodal import stage_multimodal_config
from stageserve.serving.common.server import GrpcStage, configure_logging
from stageserve.serving.common.stage_args import parse_stage_args
from stageserve.serving.encoder.servicer import EncoderServicer
from stageserve.v1 import encoder_pb2, encoder_pb2_grpc


async def main() -> None:
    config, replica = parse_stage_args("encoder")
    configure_logging(f"encoder-{replica}")
    torch.set_num_threads(1)  # one core per encoder replica; scale with replicas
    address = config.replica_address("encoder", replica)
    text = read_model_config(config.model)
    mm = stage_multimodal_config(config, load_tokenizer(config.model))
    tower = build_vision_tower(config.model, mm, text)
    observe.start(config, "encoder", replica, text.name)
    stage = GrpcStage(address, [encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name])
    e = config.encoder
    servicer = EncoderServicer(
        f"encoder-{replica}", address, text.name, tower, mm, e.max_batch_tiles, e.embedding_ttl_s
    )
    encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, stage.server)
    servicer.start()
    await stage.run(on_stop=servicer.stop)


if __name__ == "__main__":
    asyncio.run(main())
