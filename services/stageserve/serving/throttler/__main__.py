"""``python -m stageserve.serving.throttler --config FILE``."""

from __future__ import annotations

import asyncio

from stageserve.serving.common import observe
from stageserve.serving.common.server import GrpcStage, configure_logging
from stageserve.serving.common.stage_args import parse_stage_args
from stageserve.serving.throttler.servicer import ThrottlerServicer
from stageserve.v1 import throttler_pb2, throttler_pb2_grpc


async def main() -> None:
    config, replica = parse_stage_args("throttler")
    configure_logging("throttler")
    stage = GrpcStage(
        config.replica_address("throttler", replica), [throttler_pb2.DESCRIPTOR.services_by_name["Throttler"].full_name]
    )
    servicer = ThrottlerServicer(config, replica)
    observe.start(config, "throttler", replica)
    observe.watch_throttler(servicer)  # gauges and decision counters on metrics_port
    throttler_pb2_grpc.add_ThrottlerServicer_to_server(servicer, stage.server)
    servicer.start_background()
    await stage.run()


if __name__ == "__main__":
    asyncio.run(main())
