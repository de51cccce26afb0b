"""``python -m stageserve.serving.encoder --config FILE --replica N``."""

from __future__ import annotations

import asyncio

from stageserve.serving.common.server import GrpcStage, configure_logging
from stageserve.serving.common.stage_args import parse_stage_args
from stageserve.serving.encoder.servicer import EncoderServicer
from stageserve.v1 import encoder_pb2, encoder_pb2_grpc


async def main() -> None:
    config, replica = parse_stage_args("encoder")
    configure_logging(f"encoder-{replica}")
    address = config.replica_address("encoder", replica)
    stage = GrpcStage(address, [encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name])
    encoder_pb2_grpc.add_EncoderServicer_to_server(
        EncoderServicer(f"encoder-{replica}", address, config.model or "default"), stage.server
    )
    await stage.run()


if __name__ == "__main__":
    asyncio.run(main())
