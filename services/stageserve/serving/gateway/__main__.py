"""``python -m stageserve.serving.gateway --config FILE``: gRPC (hop 1) and the OpenAI HTTP API, one process."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

from stageserve.models.loader import load_tokenizer, read_model_config
from stageserve.serving.common import observe
from stageserve.serving.common.server import GrpcStage, configure_logging
from stageserve.serving.common.stage_args import parse_stage_args
from stageserve.serving.gateway import instrument
from stageserve.serving.gateway.core import GatewayCore
from stageserve.serving.gateway.http import create_app
from stageserve.serving.gateway.limits import BodyLimit
from stageserve.serving.gateway.servicer import GatewayServicer
from stageserve.v1 import gateway_pb2, gateway_pb2_grpc


async def main() -> None:
    config, _ = parse_stage_args("gateway")
    configure_logging("gateway")
    core = GatewayCore(config, load_tokenizer(config.model), read_model_config(config.model))
    await core.start()
    observe.start(config, "gateway", 0, core.model_name)
    backend = instrument.InstrumentedBackend(core)  # traces and times every request
    stage = GrpcStage(
        config.replica_address("gateway", 0),
        [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name],
        interceptors=instrument.grpc_interceptors(core.model_name),
    )
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(backend), stage.server)  # type: ignore[arg-type]
    app = create_app(backend)
    instrument.install(app, core.model_name)  # GET /metrics, tracing middleware
    limited = BodyLimit(app, config.gateway.max_prompt_bytes)  # oversize bodies -> 400 (gateway/limits.py)
    http = uvicorn.Server(uvicorn.Config(limited, host=config.host, port=config.gateway.http_port, log_level="warning"))
    http.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # GrpcStage owns the signals
    http_task = asyncio.create_task(http.serve())

    async def shutdown() -> None:
        http.should_exit = True
        await http_task

    await stage.run(on_stop=shutdown)


if __name__ == "__main__":
    asyncio.run(main())
