"""gRPC server setup shared by every stage: health, reflection, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stageserve.serving.common import tls, tracing
from stageserve.serving.common.wire_guard import WireGuard

log = logging.getLogger("stageserve")

MAX_MESSAGE_BYTES = 64 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def stage_channel(address: str) -> grpc.aio.Channel:
    """A channel to another stage; its calls carry the current trace (``traceparent``)."""
    return tls.aio_channel(address, GRPC_OPTIONS, tracing.client_interceptors())  # mTLS when configured


def configure_logging(stage: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s")


class GrpcStage:
    """A grpc.aio server with the stage's servicers, grpc.health.v1 and reflection."""

    def __init__(self, address: str, service_names: Iterable[str], interceptors: Sequence[Any] | None = None) -> None:
        """``interceptors`` default to the tracing interceptor (continues the caller's trace)."""
        chain = tracing.server_interceptors() if interceptors is None else interceptors
        # WireGuard: undecodable requests -> INVALID_ARGUMENT naming the problem (serving/common/wire_guard.py)
        self.server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[WireGuard(), *chain])
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        self.port = tls.add_port(self.server, address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        self.address = address

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def run(self, on_stop: Callable[[], Awaitable[None]] | None = None, grace_s: float = 5.0) -> None:
        """Serves until SIGTERM/SIGINT, then reports NOT_SERVING, drains for ``grace_s`` and stops."""
        await self.server.start()
        await self.set_serving(True)
        log.info("serving %s on %s", ", ".join(self.service_names), self.address)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.set_serving(False)
        await self.server.stop(grace_s)
        if on_stop is not None:
            await on_stop()
        log.info("stopped")
