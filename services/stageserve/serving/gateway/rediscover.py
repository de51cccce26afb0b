"""Applies discovery (serving/common/discovery.py) to the gateway's replica sets and throttler channel.

Run on the load-poll loop: re-resolves ``discovery: dns`` stages when due, gives new replicas stubs and drops
vanished ones (in-flight calls keep their channels), and moves the throttler channel to a listed replica when
the one it uses disappears.
"""

from __future__ import annotations

from typing import Any

from stageserve.serving.common.config import StageServeConfig
from stageserve.serving.common.discovery import Discovery, join_host_port, pick_stable
from stageserve.serving.common.server import stage_channel
from stageserve.v1 import throttler_pb2_grpc


def throttler_target(config: StageServeConfig, discovery: Discovery) -> str:
    """The throttler address to dial: a known replica, or (dns, before the first lookup) the Service name itself,
    which gRPC resolves on its own."""
    known = pick_stable(None, discovery.addresses("throttler"))
    return known or join_host_port(config.throttler.service, config.throttler.port)


async def rediscover(core: Any, now: float) -> dict[str, list[str]]:
    """Re-resolves if due and syncs ``core`` (a GatewayCore); -> the stages whose replica lists changed."""
    changed = await core.discovery.poll(now)
    for stage, addresses in changed.items():
        if stage == "throttler":
            target = pick_stable(core.throttler_address, addresses)
            if target is not None and target != core.throttler_address:
                core.throttler_address = target
                core.throttler = throttler_pb2_grpc.ThrottlerStub(stage_channel(target))
        elif stage == "encoder":
            core.encoders.sync(addresses)
        else:
            getattr(core, stage).sync(addresses)
    return changed
