"""The throttler's state machine in simulated time: each policy's admit / queue / reject, capacity, dispatch order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stageserve.policy.fairness.oit import AppLimits
from stageserve.policy.fairness.rpm import RPMConfig
from stageserve.policy.fairness.throttle import Throttle, ThrottleConfig
from stageserve.policy.fairness.types import Admit, Call, EngineLoad, Queue, Reject

HOT = EngineLoad(kv_usage=0.95, queued_prefill_tokens=0, batch_token_budget=1000)
CALM = EngineLoad(kv_usage=0.1, queued_prefill_tokens=0, batch_token_budget=1000)


def call(rid: str, user: str = "u", iid: str | None = None, idx: int = 0, app: str = "chat", inp: int = 10) -> Call:
    return Call(rid, user, app, iid or rid, idx, input_tokens=inp, max_output_tokens=10)


def throttle(policy: str, **kw: object) -> Throttle:
    return Throttle(ThrottleConfig(policy=policy, **kw))  # type: ignore[arg-type]


def test_always_admit_never_queues() -> None:
    t = throttle("always-admit", max_running_calls=1)
    assert all(isinstance(t.admit(call(f"r{i}"), 0.0), Admit) for i in range(5))


def test_fcfs_queues_over_capacity_and_dispatches_in_arrival_order() -> None:
    t = throttle("fcfs", max_running_calls=1)
    assert isinstance(t.admit(call("a0", "a"), 0.0), Admit)
    assert t.admit(call("a1", "a"), 0.1) == Queue(position=1, reason="fcfs: waiting for capacity")
    assert isinstance(t.admit(call("b0", "b"), 0.2), Queue)
    assert [c.request_id for c in t.release("a0", 10, 1.0)] == ["a1"]
    assert [c.request_id for c in t.release("a1", 10, 2.0)] == ["b0"]


def test_vtc_dispatches_the_least_served_user_first() -> None:
    t = throttle("vtc", max_running_calls=1)
    t.admit(call("a0", "a"), 0.0)
    t.admit(call("a1", "a"), 0.0)
    t.admit(call("b0", "b"), 0.0)
    t.report_tokens("a0", 5, 0.5)  # a is charged for its output as it is produced
    assert t.service_gap() > 0
    assert [c.request_id for c in t.release("a0", 10, 1.0)] == ["b0"]


def test_token_capacity_lets_a_big_call_run_alone() -> None:
    t = throttle("fcfs", max_running_calls=0, max_running_tokens=100)
    assert isinstance(t.admit(call("big", inp=500), 0.0), Admit)  # larger than capacity but nothing runs
    assert isinstance(t.admit(call("small", inp=10), 0.0), Queue)
    assert [c.request_id for c in t.release("big", 10, 1.0)] == ["small"]


def test_rpm_rejects_even_when_idle() -> None:
    t = throttle("rpm", rpm=RPMConfig(user_rpm=2))
    t.observe_load(CALM, 0.0)
    decisions = [t.admit(call(f"r{i}"), float(i)) for i in range(3)]
    assert isinstance(decisions[2], Reject) and not t.overloaded
    assert decisions[2].retry_after_s == pytest.approx(58.0)


def test_fairserve_rejects_only_new_interactions_under_overload() -> None:
    t = throttle("fairserve", limits={"chat": AppLimits(user_per_min=1)})
    assert all(isinstance(t.admit(call(f"c{i}"), float(i)), Admit) for i in range(5))  # calm: limits ignored
    t.observe_load(HOT, 10.0)
    assert t.overloaded
    assert isinstance(t.admit(call("n1", iid="new1"), 10.0), Reject)
    assert isinstance(t.admit(call("c0b", iid="c0", idx=1), 10.0), Admit)  # continuation, never rejected
    assert t.decisions == {"admitted": 6, "queued": 0, "rejected": 1}


def test_queue_counts_toward_overload_and_queued_interactions_stay_alive() -> None:
    t = throttle("fairserve", max_running_calls=1, batch_token_budget=100, limits={"chat": AppLimits(user_per_min=1)})
    t.admit(call("r0", inp=50), 0.0)
    t.admit(call("r1", user="v", inp=150, iid="v1"), 0.0)
    assert not t.overloaded
    t.admit(call("r2", user="w", inp=100, iid="w1"), 0.0)  # 250 queued prompt tokens >= 2 x 100
    assert t.overloaded
    for now in (100.0, 200.0):  # queued for longer than the 120 s idle time
        t.observe_load(EngineLoad(0.0, 0, 100), now)
    decision = t.admit(call("v1b", user="v", iid="v1", idx=1), 201.0)
    assert isinstance(decision, Queue)  # still a continuation: queued, not rejected as a new interaction


def test_release_of_a_queued_call_cancels_it() -> None:
    t = throttle("vtc", max_running_calls=1)
    t.admit(call("a0", "a"), 0.0)
    t.admit(call("b0", "b"), 0.0)
    assert t.release("b0", 0, 1.0) == [] and not t.queued
    assert t.release("a0", 3, 2.0) == [] and not t.running


def test_duplicate_request_id_is_an_error() -> None:
    t = throttle("fcfs")
    t.admit(call("r"), 0.0)
    with pytest.raises(ValueError, match="request_id"):
        t.admit(call("r"), 0.0)


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ValueError, match="policy: unknown policy 'nope'"):
        ThrottleConfig(policy="nope")


ops = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.integers(0, 3), st.floats(0.0, 4.0)),
        st.tuples(st.just("next"), st.integers(0, 40), st.floats(0.0, 4.0)),
        st.tuples(st.just("load"), st.sampled_from([0.1, 0.85, 0.95]), st.floats(0.0, 4.0)),
        st.tuples(st.just("finish"), st.integers(0, 40), st.floats(0.0, 4.0)),
    ),
    max_size=29,  # under 120 s in all: no interaction goes idle (an idle one may be rejected as new)
)


@settings(max_examples=80, deadline=None)
@given(script=ops)
def test_fairserve_never_rejects_calm_or_mid_interaction(script: list[tuple[str, float, float]]) -> None:
    t = throttle("fairserve", max_running_calls=2, limits={"chat": AppLimits(user_per_min=1, app_per_min=2)})
    now, started, serial = 0.0, [], 0
    for op, arg, dt in script:
        now += dt
        serial += 1
        if op == "load":
            t.observe_load(EngineLoad(float(arg), 0, 1000), now)
        elif op == "finish" and started:
            t.release(started[int(arg) % len(started)][0], 3, now)
        elif op == "new" or not started:
            was_overloaded = t.overloaded
            iid = f"i{serial}"
            d = t.admit(call(f"r{serial}", f"u{int(arg)}", iid), now)
            assert was_overloaded or not isinstance(d, Reject)
            if not isinstance(d, Reject):
                started.append((f"r{serial}", iid, 0))
        else:
            _, iid, idx = started[int(arg) % len(started)]
            d = t.admit(call(f"r{serial}", "u", iid, idx + 1), now)
            assert not isinstance(d, Reject)  # a later call of an admitted interaction is never rejected
            started.append((f"r{serial}", iid, idx + 1))


def test_running_calls_without_reports_expire_and_free_capacity() -> None:
    t = throttle("fcfs", max_running_calls=1)
    t.admit(call("lost"), 0.0)  # its gateway died: no report, no Release
    t.admit(call("next"), 1.0)
    assert t.expire(500.0, idle_s=600.0) == []
    t.report_tokens("lost", 1, 500.0)
    assert t.expire(1000.0, idle_s=600.0) == []  # the report kept it alive
    assert [c.request_id for c in t.expire(1100.0, idle_s=600.0)] == ["next"] and "lost" not in t.running
