"""Least-loaded replica choice from load reports.

What it does: picks the replica with the fewest pending tokens (prefill: prompt tokens not yet computed;
decode: tokens reserved), breaking ties by fewer running sequences, then by KV-cache usage, then by a
rotating index so equal replicas share work. Replicas whose report is older than ``max_age_s`` or missing
are skipped unless none is fresh. Unit: tokens. Trade-off: reports are sampled, so a burst arriving
between two reports lands on one replica; the gateway adds each routed request's tokens to its local view
until the next report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaLoad:
    address: str
    pending_tokens: int
    num_running: int
    kv_cache_usage: float
    reported_at: float
    healthy: bool = True


def pick_least_loaded(replicas: Sequence[ReplicaLoad], now: float, turn: int = 0, max_age_s: float = 5.0) -> str:
    """Address of the replica to use; raises LookupError when there is no healthy replica."""
    healthy = [r for r in replicas if r.healthy]
    if not healthy:
        raise LookupError("no healthy replica")
    fresh = [r for r in healthy if now - r.reported_at <= max_age_s] or healthy
    order = {r.address: (i - turn) % len(fresh) for i, r in enumerate(fresh)}
    best = min(fresh, key=lambda r: (r.pending_tokens, r.num_running, round(r.kv_cache_usage, 3), order[r.address]))
    return best.address
