"""The gateway's throttler channel follows discovery: it moves only when its replica leaves the DNS answer."""

from __future__ import annotations

import asyncio

from stageserve.serving.common.config import load_config
from stageserve.serving.common.discovery import Discovery
from stageserve.serving.gateway.rediscover import rediscover, throttler_target


class _Core:
    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery
        self.throttler_address = throttler_target(discovery.config, discovery)
        self.throttler = None


def test_throttler_channel_moves_only_when_its_replica_disappears():
    answers = [["10.0.0.1"], ["10.0.0.2", "10.0.0.1"], ["10.0.0.3", "10.0.0.2"]]

    async def resolver(name: str) -> list[str]:
        return answers.pop(0)

    config = load_config(overrides={"gateway": {"discovery_interval_s": 0.0},
                                    "throttler": {"discovery": "dns", "service": "llm-throttler.ml.svc"}})
    core = _Core(Discovery(config, resolver))
    assert core.throttler_address == "llm-throttler.ml.svc:50052"  # before the first lookup gRPC resolves the name

    async def run() -> list[str]:
        seen = []
        for t in (1.0, 2.0, 3.0):
            await rediscover(core, t)
            seen.append(core.throttler_address)
        return seen

    assert asyncio.run(run()) == ["10.0.0.1:50052", "10.0.0.1:50052", "10.0.0.2:50052"]
    assert core.throttler is not None  # a stub on the new channel


def test_static_config_dials_the_configured_throttler():
    config = load_config(overrides={"host": "127.0.0.1", "throttler": {"port": 6100}})
    assert throttler_target(config, Discovery(config)) == "127.0.0.1:6100"
    endpoints = load_config(overrides={"throttler": {"endpoints": ["th-a:7000", "th-b:7000"]}})
    assert throttler_target(endpoints, Discovery(endpoints)) == "th-a:7000"
