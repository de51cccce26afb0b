"""Least-loaded replica choice and KV format negotiation (pure)."""

from __future__ import annotations

import pytest

from stageserve.policy.routing.kv_format import ACCURATE_COMPACT, negotiate
from stageserve.policy.routing.least_loaded import ReplicaLoad, pick_least_loaded


def _r(addr, pending, running=0, usage=0.0, at=100.0, healthy=True):
    return ReplicaLoad(addr, pending, running, usage, at, healthy)


def test_fewest_pending_tokens_wins_then_running_then_usage():
    assert pick_least_loaded([_r("a", 500), _r("b", 100), _r("c", 300)], now=100.0) == "b"
    assert pick_least_loaded([_r("a", 0, running=3), _r("b", 0, running=1)], now=100.0) == "b"
    assert pick_least_loaded([_r("a", 0, usage=0.9), _r("b", 0, usage=0.2)], now=100.0) == "b"


def test_ties_rotate_across_turns():
    replicas = [_r("a", 0), _r("b", 0), _r("c", 0)]
    picks = {pick_least_loaded(replicas, now=100.0, turn=t) for t in range(3)}
    assert picks == {"a", "b", "c"}


def test_unhealthy_skipped_and_stale_reports_used_only_as_fallback():
    assert pick_least_loaded([_r("a", 0, healthy=False), _r("b", 900)], now=100.0) == "b"
    fresh_vs_stale = [_r("old", 0, at=10.0), _r("new", 50, at=99.0)]
    assert pick_least_loaded(fresh_vs_stale, now=100.0) == "new"
    assert pick_least_loaded([_r("old", 0, at=10.0)], now=100.0) == "old"
    with pytest.raises(LookupError):
        pick_least_loaded([_r("a", 0, healthy=False)], now=100.0)


def test_negotiation_prefers_compact_on_slow_links_and_bf16_on_fast():
    both = {"bf16", "fp8"}
    assert negotiate("auto", both, both, link_gbps=10) == "fp8"
    assert negotiate("auto", both, both, link_gbps=100) == "bf16"
    assert negotiate("auto", {"bf16", "fp8", "hack2"}, {"bf16", "fp8", "hack2"}, link_gbps=10) == "fp8"
    every = {"bf16", "fp8", "kivi2", "hack2", "hack4", "hack-k4v2"}
    assert negotiate("auto", every, every, link_gbps=10) == ACCURATE_COMPACT  # fewest bytes within +1.5 %
    assert negotiate("hack2", every, every, link_gbps=10) == "hack2"  # 2-bit only when configured
    assert negotiate("auto", {"bf16"}, both, link_gbps=1) == "bf16"
    assert negotiate("bf16", both, both, link_gbps=1) == "bf16"


def test_negotiation_errors_name_the_field():
    with pytest.raises(ValueError, match="kv_format"):
        negotiate("hack2", {"bf16"}, {"bf16"}, link_gbps=1)
    with pytest.raises(ValueError, match="share no KV format"):
        negotiate("auto", {"fp8"}, {"bf16"}, link_gbps=1)
