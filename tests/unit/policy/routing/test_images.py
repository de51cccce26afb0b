"""Image routing: least pending image tokens (largest image first, split across replicas) and round-robin."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stageserve.policy.routing.images import assign_least_pending, assign_round_robin


def test_multi_image_request_is_split_largest_first():
    picks = assign_least_pending([64, 320, 64, 64], {"a": 0, "b": 0})
    # 320 -> a (tie: first listed), then 64s go to b until b passes a.
    assert picks == ["b", "a", "b", "b"]


def test_pending_load_steers_images_away_from_a_busy_replica():
    assert assign_least_pending([64, 64], {"a": 1000, "b": 0, "c": 100}) == ["b", "b"]
    assert assign_least_pending([64, 64, 64], {"a": 1000, "b": 0, "c": 100}) == ["b", "b", "c"]


def test_round_robin_cycles_from_the_turn():
    assert assign_round_robin(3, ["a", "b"], 1) == ["b", "a", "b"]


def test_no_replica_raises_lookup_error():
    with pytest.raises(LookupError):
        assign_least_pending([1], {})
    with pytest.raises(LookupError):
        assign_round_robin(1, [], 0)


@given(
    st.lists(st.integers(1, 2000), min_size=1, max_size=16),
    st.dictionaries(st.sampled_from("abcd"), st.integers(0, 5000), min_size=1),
)
def test_least_pending_bounds_the_imbalance(estimates, pending):
    """Greedy largest-first: after placement, each replica that got an image was the least loaded when it
    did, so the most loaded replica exceeds the least loaded by at most the largest image (or its start)."""
    picks = assign_least_pending(estimates, pending)
    assert len(picks) == len(estimates) and set(picks) <= set(pending)
    load = dict(pending)
    for address, n in zip(picks, estimates, strict=True):
        load[address] += n
    got = {a for a in picks}
    for a in got:
        assert load[a] - min(load.values()) <= max(estimates)
