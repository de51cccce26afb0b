"""OIT: overload hysteresis, interaction-level limits, continuations never rejected, idle expiry, fit_limits."""

from __future__ import annotations

import pytest

from stageserve.policy.fairness.oit import (
    OIT,
    AppLimits,
    OITConfig,
    OverloadDetector,
    OverloadThresholds,
    fit_limits,
    percentile_of,
    window_counts,
)
from stageserve.policy.fairness.types import Admit, Call, EngineLoad, Reject

BUDGET = 1000
CALM = EngineLoad(kv_usage=0.1, queued_prefill_tokens=0, batch_token_budget=BUDGET)
HOT = EngineLoad(kv_usage=0.95, queued_prefill_tokens=0, batch_token_budget=BUDGET)


def call(iid: str, idx: int = 0, user: str = "u", app: str = "chat") -> Call:
    return Call(f"{iid}.{idx}", user, app, iid, call_index=idx, input_tokens=100)


def oit(user: float | None = 1, app: float | None = None) -> OIT:
    return OIT({"chat": AppLimits(user_per_min=user, app_per_min=app, max_calls_per_interaction=8)})


def test_nothing_is_rejected_without_overload() -> None:
    policy = oit(user=1, app=1)
    decisions = [policy.on_call(call(f"i{k}", user=f"u{k % 3}"), k * 0.1, CALM) for k in range(50)]
    assert all(isinstance(d, Admit) for d in decisions)
    assert policy.throttled_interactions == 0 and policy.stats()["chat"].new_interactions == 50


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ([(0.89, 0)], [False]),
        ([(0.90, 0)], [True]),  # kv enter threshold is inclusive
        ([(0.0, 2 * BUDGET)], [True]),  # queued ≥ 2× budget enters
        ([(0.0, 2 * BUDGET - 1)], [False]),
        ([(0.95, 0), (0.85, 0), (0.80, 0), (0.79, 0)], [True, True, True, False]),
        ([(0.95, 0), (0.5, BUDGET), (0.5, BUDGET - 1)], [True, True, False]),  # both must be calm to leave
        ([(0.85, 0), (0.85, 1500), (0.95, 0)], [False, False, True]),  # between thresholds: stays as is
    ],
)
def test_overload_hysteresis(loads: list[tuple[float, int]], expected: list[bool]) -> None:
    detector = OverloadDetector()
    states = [detector.update(EngineLoad(kv, q, BUDGET)) for kv, q in loads]
    assert states == expected


def test_thresholds_are_configurable() -> None:
    detector = OverloadDetector(OverloadThresholds(kv_enter=0.5, kv_leave=0.3, queue_enter=10, queue_leave=5))
    assert detector.update(EngineLoad(0.5, 0, 10)) and detector.update(EngineLoad(0.4, 0, 10))
    assert not detector.update(EngineLoad(0.2, 49, 10)) and detector.transitions == 2


def test_new_interaction_over_limit_under_overload_is_rejected_with_retry_after() -> None:
    policy = oit(user=2)
    assert isinstance(policy.on_call(call("i1"), 0.0, HOT), Admit)
    assert isinstance(policy.on_call(call("i2"), 10.0), Admit)
    rejected = policy.on_call(call("i3"), 25.0)
    assert isinstance(rejected, Reject)
    assert rejected.retry_after_s == pytest.approx(35.0)  # the t=0 start leaves the window at 60
    assert "user u" in rejected.reason
    assert isinstance(policy.on_call(call("i4", user="v"), 26.0), Admit)  # limits are per (user, app)
    assert isinstance(policy.on_call(call("i3"), 60.0), Admit)  # rejections were not counted
    assert policy.throttled_interactions == 1 and policy.throttled_by_user["u", "chat"] == 1
    assert policy.stats()["chat"].throttled_interactions == 1


def test_retry_after_has_a_floor_and_app_limit_applies() -> None:
    policy = oit(user=None, app=2)
    policy.on_call(call("a", user="x"), 0.0, HOT)
    policy.on_call(call("b", user="y"), 59.0)
    rejected = policy.on_call(call("c", user="z"), 59.5)
    assert isinstance(rejected, Reject) and "app chat" in rejected.reason
    assert rejected.retry_after_s == 1.0  # 0.5 s until t=0 expires, floored at 1 s


def test_mid_interaction_calls_are_never_rejected_even_far_over_the_limit() -> None:
    policy = oit(user=1, app=1)
    assert isinstance(policy.on_call(call("run"), 0.0, HOT), Admit)
    assert isinstance(policy.on_call(call("new"), 1.0), Reject)  # the limit is reached
    for idx in range(1, 40):  # well past max_calls_per_interaction: known interactions are never capped
        assert isinstance(policy.on_call(call("run", idx), 1.0 + idx), Admit)
    assert policy.throttled_interactions == 1 and policy.stats()["chat"].continuation_calls == 39


def test_unknown_interaction_with_call_index_is_a_continuation_up_to_the_cap() -> None:
    policy = oit(user=1)
    policy.on_call(call("seen"), 0.0, HOT)
    assert isinstance(policy.on_call(call("restarted", idx=3), 1.0), Admit)  # begun before we saw it
    assert isinstance(policy.on_call(call("restarted", idx=4), 2.0), Admit)
    assert isinstance(policy.on_call(call("forged", idx=8), 3.0), Reject)  # cap 8: treated as a new one
    assert policy.stats()["chat"].adopted_interactions == 1


def test_interaction_ends_after_idle_time_or_end_signal() -> None:
    policy = oit(user=1)
    assert isinstance(policy.on_call(call("i1"), 0.0, HOT), Admit)
    assert isinstance(policy.on_call(call("i1", 1), 119.9), Admit)  # idle for 119.9 s: still active
    policy.touch("i1", 200.0)  # a long call of i1 finished at 200
    assert isinstance(policy.on_call(call("fill"), 300.0), Admit)  # fills u's window again (i1's start expired)
    assert isinstance(policy.on_call(call("i1", 2), 319.0), Admit)  # 119 s after the touch, window full
    assert isinstance(policy.on_call(call("fill2"), 400.0), Admit)  # "fill" expired at 360
    assert isinstance(policy.on_call(call("i1", 3), 440.0), Reject)  # 121 s idle: ended, now a new interaction
    assert policy.active_interactions(440.0) == 1  # fill2 only
    assert isinstance(policy.on_call(call("i2"), 500.0), Admit)
    assert policy.end_interaction("i2", 501.0) and not policy.end_interaction("i2", 501.0)
    assert isinstance(policy.on_call(call("i2", 1), 502.0), Reject)  # ended ids are not "unknown"


def test_apps_without_limits_are_unlimited_by_default() -> None:
    policy = OIT({}, OITConfig())
    assert all(isinstance(policy.on_call(call(f"i{k}", app="x"), 0.0, HOT), Admit) for k in range(100))
    strict = OIT({}, OITConfig(default_limits=AppLimits(user_per_min=1)))
    strict.on_call(call("a", app="x"), 0.0, HOT)
    assert isinstance(strict.on_call(call("b", app="x"), 0.0), Reject)


def test_percentile_and_window_counts() -> None:
    assert percentile_of([4, 1, 3, 2], 50) == 2.5
    assert percentile_of([1, 1, 1, 2, 3], 99) == pytest.approx(2.96)  # pos 3.96 between 2 and 3
    assert percentile_of([7], 99) == 7
    assert window_counts([0, 10, 20, 100]) == [1, 2, 3, 1]
    assert window_counts([0, 60, 60]) == [1, 1, 2]  # (t − 60, t]: a start 60 s earlier has expired
    with pytest.raises(ValueError):
        percentile_of([], 50)


def test_fit_limits_on_a_hand_made_history() -> None:
    history = [("u1", "chat", 0.0), ("u1", "chat", 10.0), ("u1", "chat", 20.0), ("u1", "chat", 100.0)]
    history += [("u2", "chat", 5.0), ("u3", "code", 0.0), ("u3", "code", 30.0)]
    limits = fit_limits(history, percentile=99, slack=1.2)
    # chat: per-user samples u1 [1, 2, 3, 1] + u2 [1] → p99 = 2.96; app samples [1, 2, 3, 4, 1] → p99 = 3.96
    assert limits["chat"].user_per_min == pytest.approx(2.96 * 1.2)
    assert limits["chat"].app_per_min == pytest.approx(3.96 * 1.2)
    assert limits["code"].user_per_min == pytest.approx(1.99 * 1.2)  # samples [1, 2]
    assert fit_limits(history, percentile=50, slack=1.0)["chat"].user_per_min == 1.0
    half_minute = fit_limits(history, percentile=100, slack=1.0, window_s=30.0)  # per minute: ×2
    assert half_minute["chat"].user_per_min == 6.0  # u1: 0, 10, 20 in one 30 s window
    assert half_minute["chat"].app_per_min == 8.0  # 0, 5, 10, 20 in (−10, 20]


def test_fitted_limits_drive_the_throttle() -> None:
    history = [("u", "chat", float(t)) for t in (0, 20, 40)]  # 3 per minute, p99 3 → limit 3.6
    policy = OIT(fit_limits(history, slack=1.2))
    admitted = [isinstance(policy.on_call(call(f"i{k}"), float(k), HOT), Admit) for k in range(6)]
    assert admitted == [True, True, True, True, False, False]  # starts while fewer than 3.6 in the window
