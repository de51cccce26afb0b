"""VTC: lowest counter first, the lift rule, output charging, and the fairness bound (property test)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stageserve.policy.fairness.fcfs import FCFS
from stageserve.policy.fairness.types import Call, Scheduler
from stageserve.policy.fairness.vtc import VTC, VTCConfig

ALWAYS: Callable[[Call], bool] = lambda c: True


def pop_id(s: Scheduler, now: float = 0.0) -> str:
    c = s.pop_next(now, ALWAYS)
    assert c is not None
    return c.request_id


def call(user: str, rid: str, inp: int = 10, out: int = 10, idx: int = 0) -> Call:
    return Call(rid, user, "app", f"{rid}-i", call_index=idx, input_tokens=inp, max_output_tokens=out)


def drain(s: Scheduler, now: float = 0.0) -> list[str]:
    order = []
    while (c := s.pop_next(now, ALWAYS)) is not None:
        order.append(c.request_id)
    return order


def test_lowest_counter_is_served_fifo_within_user() -> None:
    vtc = VTC()
    for c in (call("a", "a1", 100), call("b", "b1", 10), call("a", "a2", 5), call("b", "b2", 5)):
        vtc.enqueue(c, 0.0)
    assert drain(vtc) == ["a1", "b1", "b2", "a2"]  # a1 wins the 0/0 tie by arrival, then b is behind
    assert vtc.counters() == {"a": 105.0, "b": 15.0}
    assert len(vtc) == 0 and vtc.backlogged_users() == frozenset()


def test_head_that_does_not_fit_blocks_and_stays_queued() -> None:
    vtc = VTC()
    vtc.enqueue(call("a", "big", 500), 0.0)
    assert vtc.pop_next(0.0, lambda c: c.prompt_tokens < 100) is None
    assert vtc.backlogged_users() == {"a"} and len(vtc) == 1 and vtc.counters()["a"] == 0.0


def test_lift_to_min_of_other_backlogged_users() -> None:
    vtc = VTC()
    for c in (call("a", "a1", 300), call("a", "a2"), call("b", "b1", 200), call("b", "b2")):
        vtc.enqueue(c, 0.0)
    assert pop_id(vtc, 0.0) == "a1"
    assert pop_id(vtc, 0.0) == "b1"
    vtc.enqueue(call("c", "c1"), 1.0)  # new user: would otherwise starve a and b with counter 0
    assert vtc.counters()["c"] == 200.0 and vtc.lifts == 1
    vtc.enqueue(call("c", "c2"), 1.0)  # already backlogged: no second lift
    assert vtc.counters()["c"] == 200.0


def test_lift_to_last_departed_when_nobody_else_is_backlogged() -> None:
    vtc = VTC()
    vtc.enqueue(call("a", "a1", 400), 0.0)
    drain(vtc)  # a leaves the queue with counter 400
    vtc.enqueue(call("b", "b1", 10), 5.0)  # b was idle: it must not bank 400 of credit
    assert vtc.counters()["b"] == 400.0
    drain(vtc)  # b leaves at 410: the last departure
    vtc.enqueue(call("a", "a2"), 6.0)  # a returns: lifted from 400 to 410
    assert vtc.counters()["a"] == 410.0


def test_lift_never_lowers_a_counter() -> None:
    vtc = VTC()
    vtc.enqueue(call("a", "a1", 1000), 0.0)
    drain(vtc)
    vtc.enqueue(call("b", "b1", 1), 0.0)
    vtc.enqueue(call("a", "a2", 1), 0.0)  # b is backlogged at 1000 and a is already at 1000
    assert vtc.counters() == {"a": 1000.0, "b": 1000.0}
    vtc.enqueue(call("c", "c1", 1), 0.0)
    assert drain(vtc)[0] in {"a2", "b1"}


def test_output_tokens_charged_per_report_with_weights() -> None:
    vtc = VTC(VTCConfig(w_in=1.0, w_out=2.0), weights={"heavy": 2.0})
    vtc.enqueue(call("light", "l1", inp=10), 0.0)
    vtc.enqueue(call("heavy", "h1", inp=10), 0.0)
    drain(vtc)
    assert vtc.counters() == {"light": 10.0, "heavy": 5.0}
    vtc.on_output_tokens("l1", 3, 1.0)
    vtc.on_output_tokens("h1", 4, 1.0)
    assert vtc.counters() == {"light": 16.0, "heavy": 9.0}
    assert vtc.running()["l1"].output_tokens == 3
    vtc.on_finish("l1", 2.0)
    vtc.on_output_tokens("l1", 100, 2.0)  # finished (or unknown) calls are not charged
    vtc.on_output_tokens("nope", 100, 2.0)
    assert vtc.counters()["light"] == 16.0 and "l1" not in vtc.running()
    with pytest.raises(ValueError):
        vtc.set_weight("x", 0.0)


def test_cancel_queued_call_and_departure() -> None:
    vtc = VTC()
    vtc.enqueue(call("a", "a1", 50), 0.0)
    drain(vtc)
    vtc.enqueue(call("b", "b1"), 0.0)
    assert vtc.cancel("b1", 0.0) and not vtc.cancel("b1", 0.0)
    assert vtc.backlogged_users() == frozenset() and len(vtc) == 0


def test_fcfs_baseline_serves_in_arrival_order_and_keeps_service_counters() -> None:
    fcfs = FCFS()
    for c in (call("a", "a1", 100), call("a", "a2", 100), call("b", "b1", 1), call("b", "b2", 1)):
        fcfs.enqueue(c, 0.0)
    assert fcfs.pop_next(0.0, lambda c: c.prompt_tokens < 50) is None  # head-of-line blocking
    assert fcfs.cancel("b2", 0.0) and fcfs.backlogged_users() == {"a", "b"}
    assert drain(fcfs) == ["a1", "a2", "b1"]
    fcfs.on_output_tokens("b1", 4, 1.0)
    assert fcfs.counters() == {"a": 200.0, "b": 9.0} and len(fcfs) == 0


# ---- the fairness bound --------------------------------------------------------------------------------
def simulate_gaps(
    sched: Scheduler, patterns: dict[str, list[tuple[int, int]]], budget: int, steps: int, w_in: float, w_out: float
) -> list[float]:
    """Work-conserving server, all users kept backlogged; returns max service gap after each phase.

    Capacity: running calls reserve prompt + output tokens, at most `budget` in all (M = budget). Each step
    admits by pop_next while the head fits, then every running call generates one token, reported at once.
    Service W is computed here, independently of the scheduler's counters.
    """
    feeds = {u: itertools.cycle(p) for u, p in patterns.items()}
    serial = itertools.count()
    queued = dict.fromkeys(patterns, 0)
    service = dict.fromkeys(patterns, 0.0)
    running: dict[str, list[int]] = {}  # request id -> [remaining output, reserved]
    used = [0]
    calls: dict[str, Call] = {}

    def top_up(user: str, now: float) -> None:
        while queued[user] < 2:
            inp, out = next(feeds[user])
            c = call(user, f"{user}{next(serial)}", inp, out)
            sched.enqueue(c, now)
            queued[user] += 1

    def fits(c: Call) -> bool:
        return used[0] + c.prompt_tokens + c.max_output_tokens <= budget

    gaps: list[float] = []
    for user in patterns:
        top_up(user, 0.0)
    for step in range(steps):
        now = float(step)
        while (c := sched.pop_next(now, fits)) is not None:
            queued[c.user] -= 1
            top_up(c.user, now)
            used[0] += c.prompt_tokens + c.max_output_tokens
            running[c.request_id] = [c.max_output_tokens, c.prompt_tokens + c.max_output_tokens]
            calls[c.request_id] = c
            service[c.user] += w_in * c.prompt_tokens
        assert running, "work conservation: an empty batch with a backlog"
        assert sched.backlogged_users() == set(patterns)
        gaps.append(max(service.values()) - min(service.values()))
        for rid in list(running):
            sched.on_output_tokens(rid, 1, now)
            service[calls[rid].user] += w_out
            running[rid][0] -= 1
            if running[rid][0] == 0:
                used[0] -= running.pop(rid)[1]
                sched.on_finish(rid, now)
        gaps.append(max(service.values()) - min(service.values()))
    return gaps


lengths = st.tuples(st.integers(1, 64), st.integers(1, 32))
streams = st.dictionaries(
    st.sampled_from(["u1", "u2", "u3", "u4"]), st.lists(lengths, min_size=1, max_size=6), min_size=2, max_size=4
)


@settings(max_examples=60, deadline=None)
@given(patterns=streams, extra=st.integers(0, 96), w_out=st.sampled_from([1.0, 2.0]))
def test_vtc_fairness_bound_holds_at_every_step(
    patterns: dict[str, list[tuple[int, int]]], extra: int, w_out: float
) -> None:
    budget = 64 + 32 + extra  # every call fits an empty batch
    l_in_max = max(i for p in patterns.values() for i, _ in p)
    bound = 2 * max(1.0 * l_in_max, w_out * budget)
    gaps = simulate_gaps(VTC(VTCConfig(w_in=1.0, w_out=w_out)), patterns, budget, 120, 1.0, w_out)
    assert max(gaps) <= bound


def test_the_bound_check_can_fail_fcfs_breaks_it() -> None:
    """Same simulator, FCFS: a user whose calls are long gets more and more service; VTC stays bounded."""
    patterns = {"long": [(64, 32)], "short": [(1, 1)]}
    budget = 96
    bound = 2 * max(64.0, 2.0 * budget)
    vtc_gaps = simulate_gaps(VTC(), patterns, budget, 400, 1.0, 2.0)
    fcfs_gaps = simulate_gaps(FCFS(), patterns, budget, 400, 1.0, 2.0)
    assert max(vtc_gaps) <= bound < max(fcfs_gaps)
