"""Where the gateway finds the replicas of the stages it calls (throttler, encoder, prefill, decode).

Per stage (serving/common/config.py):
- default (``discovery: static``): ``host:port + 10*i`` for i < replicas, what ``stageserve up`` starts;
- ``endpoints: [host:port, ...]``: exactly those (static multi-host setups);
- ``discovery: dns`` + ``service``: every address the DNS name resolves to, on the stage's ``port``. Aimed at a
  Kubernetes *headless* Service (``clusterIP: None``), whose name resolves to the IPs of its ready pods, so
  re-resolving every ``gateway.discovery_interval_s`` picks up replicas that appear or disappear.

``stage_addresses`` is the pure part (config + resolver answer -> addresses); ``Discovery`` re-resolves on a
schedule with an injectable resolver. A failed lookup keeps the last known set (a DNS hiccup must not drop
every replica); replicas that are gone but still listed just fail their load polls and are not picked.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable

from stageserve.serving.common.config import StageServeConfig

DISCOVERED_STAGES = ("throttler", "encoder", "prefill", "decode")
Resolver = Callable[[str], Awaitable[list[str]]]  # DNS name -> IP addresses

log = logging.getLogger("stageserve.discovery")


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def stage_addresses(config: StageServeConfig, stage: str, resolved: Iterable[str] | None = None) -> list[str]:
    """The replica addresses of ``stage``: static ones, or ``resolved`` IPs (``discovery: dns``) on its port."""
    cfg = getattr(config, stage)
    if cfg.discovery == "dns":
        return sorted({join_host_port(ip, cfg.port) for ip in resolved or ()})
    if cfg.endpoints:
        return list(dict.fromkeys(cfg.endpoints))
    return config.addresses(stage)


def pick_stable(current: str | None, addresses: list[str]) -> str | None:
    """One address for a single-channel client (the throttler): keep ``current`` while it is listed."""
    if current in addresses:
        return current
    return addresses[0] if addresses else None


async def resolve_dns(name: str) -> list[str]:
    """Every IP address ``name`` resolves to (a headless Service: its ready pods). Raises OSError on failure."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class Discovery:
    """The current address list of each stage the gateway calls, re-resolved at most every ``interval_s``."""

    def __init__(self, config: StageServeConfig, resolver: Resolver = resolve_dns) -> None:
        self.config = config
        self.resolver = resolver
        self.interval_s = config.gateway.discovery_interval_s
        self.dynamic = tuple(s for s in DISCOVERED_STAGES if getattr(config, s).discovery == "dns")
        self.current: dict[str, list[str]] = {s: stage_addresses(config, s) for s in DISCOVERED_STAGES}
        self._last: float | None = None

    def addresses(self, stage: str) -> list[str]:
        return list(self.current[stage])

    def due(self, now: float) -> bool:
        return bool(self.dynamic) and (self._last is None or now - self._last >= self.interval_s)

    async def poll(self, now: float) -> dict[str, list[str]]:
        """Re-resolves the dns stages if due; -> the stages whose address list changed (new lists)."""
        if not self.due(now):
            return {}
        self._last = now
        answers = await asyncio.gather(*(self._resolve(s) for s in self.dynamic))
        changed = {}
        for stage, ips in zip(self.dynamic, answers, strict=True):
            if ips is None:
                continue
            found = stage_addresses(self.config, stage, ips)
            if found != self.current[stage]:
                log.info("%s replicas: %s -> %s", stage, self.current[stage], found)
                self.current[stage] = found
                changed[stage] = found
        return changed

    async def _resolve(self, stage: str) -> list[str] | None:
        name = getattr(self.config, stage).service
        try:
            return await self.resolver(name)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            log.warning("discovery: resolving %s (%s) failed, keeping %s: %s", name, stage, self.current[stage], exc)
            return None

