"""``python -m stageserve.serving.decode --config FILE --replica N``."""

from __future__ import annotations

import asyncio

from stageserve.serving.common import observe
from stageserve.serving.common.engine_stage import build_engine
from stageserve.serving.common.server import GrpcStage, configure_logging
from stageserve.serving.common.stage_args import parse_stage_args
from stageserve.serving.decode.servicer import DecodeServicer
from stageserve.v1 import decode_pb2, decode_pb2_grpc


async def main() -> None:
    config, replica = parse_stage_args("decode")
    configure_logging(f"decode-{replica}")
    address = config.replica_address("decode", replica)
    engine = build_engine(config, config.decode, role="decode")
    observe.start(config, "decode", replica, engine.engine.model_config.name, load=lambda: engine.load)
    stage = GrpcStage(address, [decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name])
    decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(engine, f"decode-{replica}", address), stage.server)

    async def shutdown() -> None:
        engine.shutdown()

    await stage.run(on_stop=shutdown)


if __name__ == "__main__":
    asyncio.run(main())
