"""The replicas of one stage as the gateway sees them: a stub per address and its latest load report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc

from stageserve.policy.routing.least_loaded import ReplicaLoad, pick_least_loaded
from stageserve.serving.common.convert import FORMAT_NAMES
from stageserve.serving.common.errors import Unavailable
from stageserve.serving.common.server import stage_channel
from stageserve.v1 import common_pb2


class ReplicaSet:
    """The replicas of one stage with their latest load reports."""

    def __init__(
        self,
        stage: str,
        addresses: list[str],
        stub_cls: Any,
        pending_of: Callable[[common_pb2.StageLoad], int] = lambda load: load.pending_tokens,
    ) -> None:
        self.stage = stage
        self.pending_of = pending_of  # which load field routing balances (encoders: pending image tokens)
        self.stubs = {a: stub_cls(stage_channel(a)) for a in addresses}
        self.loads = {a: ReplicaLoad(a, 0, 0, 0.0, 0.0, healthy=False) for a in addresses}
        self.formats: dict[str, set[str]] = {a: set() for a in addresses}
        self.raw: dict[str, common_pb2.StageLoad] = {}
        self._turn = 0
        self._stub_cls = stub_cls

    def sync(self, addresses: list[str]) -> None:
        """Discovery changed the replica list: new ones get stubs (unhealthy until polled), gone ones are dropped
        (calls already in flight keep their channel)."""
        for a in set(self.stubs) - set(addresses):
            for table in (self.stubs, self.loads, self.formats, self.raw):
                table.pop(a, None)
        for a in addresses:
            if a not in self.stubs:
                self.stubs[a] = self._stub_cls(stage_channel(a))
                self.loads[a] = ReplicaLoad(a, 0, 0, 0.0, 0.0, healthy=False)
                self.formats[a] = set()

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh_one(a) for a in list(self.stubs)))

    async def _refresh_one(self, address: str) -> None:
        try:
            load = await self.stubs[address].GetLoad(common_pb2.LoadRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            load = None
        if address not in self.stubs:  # dropped by discovery while polling
            return
        if load is None:
            self.loads[address] = ReplicaLoad(address, 0, 0, 0.0, time.monotonic(), healthy=False)
            return
        self.loads[address] = ReplicaLoad(
            address, self.pending_of(load), load.num_running, load.kv_cache_usage, time.monotonic()
        )
        self.raw[address] = load  # forwarded to the throttler (gateway/throttling.py)
        self.formats[address] = {FORMAT_NAMES[f] for f in load.kv_formats if f in FORMAT_NAMES}

    def healthy(self) -> list[str]:
        return [a for a, load in self.loads.items() if load.healthy]

    def add_pending(self, address: str, tokens: int) -> None:
        """Counts work sent to ``address`` locally until its next load report."""
        old = self.loads[address]
        self.loads[address] = ReplicaLoad(
            address, old.pending_tokens + tokens, old.num_running + 1, old.kv_cache_usage, old.reported_at
        )

    def pick(self, tokens: int) -> str:
        self._turn += 1
        try:
            address = pick_least_loaded(list(self.loads.values()), time.monotonic(), self._turn)
        except LookupError:
            raise Unavailable(f"no healthy {self.stage} replica") from None
        self.add_pending(address, tokens)
        return address
