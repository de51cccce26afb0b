"""``python -m stageserve.serving.prefill --config FILE --replica N``."""

from __future__ import annotations

import asyncio

from stageserve.serving.common import observe
from stageserve.serving.common.engine_stage import build_engine
from stageserve.serving.common.server import GrpcStage, configure_logging
from stageserve.serving.common.stage_args import parse_stage_args
from stageserve.serving.prefill.servicer import PrefillServicer
from stageserve.v1 import prefill_pb2, prefill_pb2_grpc


async def main() -> None:
    config, replica = parse_stage_args("prefill")
    configure_logging(f"prefill-{replica}")
    address = config.replica_address("prefill", replica)
    engine = build_engine(config, config.prefill, role="prefill")
    observe.start(config, "prefill", replica, engine.engine.model_config.name, load=lambda: engine.load)
    stage = GrpcStage(address, [prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name])
    servicer = PrefillServicer(
        engine, f"prefill-{replica}", address, config.prefill.link_rate_gbps, config.prefill.stream_kv_layerwise
    )
    prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, stage.server)

    async def shutdown() -> None:
        engine.shutdown()

    await stage.run(on_stop=shutdown)


if __name__ == "__main__":
    asyncio.run(main())
