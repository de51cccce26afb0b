"""Per-call RPM limiter: sliding-window limits, exact retry-after, and how it cuts interactions."""

from __future__ import annotations

import pytest

from stageserve.policy.fairness.rpm import RPMConfig, RPMLimiter
from stageserve.policy.fairness.types import Admit, Call, Reject


def call(user: str = "u", app: str = "chat", iid: str = "i", idx: int = 0, rid: str = "") -> Call:
    return Call(rid or f"{iid}.{idx}", user, app, iid, call_index=idx, input_tokens=100, max_output_tokens=50)


def test_limit_per_window_and_exact_retry_after() -> None:
    rpm = RPMLimiter(RPMConfig(user_rpm=3))
    for t in (0.0, 10.0, 20.0):
        assert isinstance(rpm.check(call(iid=f"i{t}"), t), Admit)
    rejected = rpm.check(call(iid="late"), 30.0)
    assert isinstance(rejected, Reject)
    assert rejected.retry_after_s == pytest.approx(30.0)  # the t=0 entry leaves the window at 60
    assert "user u" in rejected.reason
    assert isinstance(rpm.check(call(iid="late2"), 59.999), Reject)
    assert isinstance(rpm.check(call(iid="ok"), 60.0), Admit)  # rejected calls were not counted
    again = rpm.check(call(iid="next"), 61.0)
    assert isinstance(again, Reject) and again.retry_after_s == pytest.approx(9.0)  # t=10 expires at 70
    assert (rpm.admitted, rpm.rejected) == (4, 3)


def test_limits_are_per_user_and_optionally_per_app() -> None:
    rpm = RPMLimiter(RPMConfig(user_rpm=1, app_rpm=2))
    assert isinstance(rpm.check(call(user="a"), 0.0), Admit)
    assert isinstance(rpm.check(call(user="a", iid="x"), 1.0), Reject)  # a's own limit
    assert isinstance(rpm.check(call(user="b"), 2.0), Admit)  # b has its own window
    over_app = rpm.check(call(user="c"), 5.0)
    assert isinstance(over_app, Reject) and "app chat" in over_app.reason
    assert over_app.retry_after_s == pytest.approx(55.0)
    assert isinstance(rpm.check(call(user="c", app="other"), 5.0), Admit)


def test_unlimited_user_dimension() -> None:
    rpm = RPMLimiter(RPMConfig(user_rpm=None, app_rpm=None))
    assert all(isinstance(rpm.check(call(iid=str(i)), 0.0), Admit) for i in range(1000))


def test_per_call_limit_cuts_an_interaction_midway_and_wastes_its_tokens() -> None:
    """Interactions of 3 calls under a 4-calls/min limit: the second one is cut after its first call."""
    rpm = RPMLimiter(RPMConfig(user_rpm=4))
    outcome: dict[str, list[bool]] = {}
    for n, iid in enumerate(("first", "second")):
        for idx in range(3):
            decision = rpm.check(call(iid=iid, idx=idx), now=n * 10.0 + idx)
            outcome.setdefault(iid, []).append(isinstance(decision, Admit))
    assert outcome["first"] == [True, True, True]
    assert outcome["second"] == [True, False, False]  # call 0 ran, then the interaction was cut
    cut = [iid for iid, ok in outcome.items() if not all(ok)]
    wasted = sum(call().input_tokens + call().max_output_tokens for iid in cut for ok in outcome[iid] if ok)
    assert wasted == 150  # the tokens call 0 of "second" consumed for nothing
