"""WSC: normalisation by (app, stage) cost, EWMA learning and cold start, continuation preference, bound."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stageserve.policy.fairness.types import Call, Scheduler
from stageserve.policy.fairness.vtc import VTC
from stageserve.policy.fairness.wsc import WSC, CostModel, WSCConfig

ALWAYS: Callable[[Call], bool] = lambda c: True


def pop_id(s: Scheduler, now: float = 0.0) -> str:
    c = s.pop_next(now, ALWAYS)
    assert c is not None
    return c.request_id


APPS = {"longsys": (100, 2000, 200), "short": (100, 0, 200)}  # app -> typical (input, system, output)


def call(user: str, rid: str, app: str = "short", inp: int = 10, sys: int = 0, idx: int = 0, iid: str = "") -> Call:
    return Call(rid, user, app, iid or f"{rid}-i", call_index=idx, input_tokens=inp, system_tokens=sys)


def typical(user: str, app: str, rid: str) -> Call:
    inp, sys, out = APPS[app]
    return Call(rid, user, app, rid, input_tokens=inp, system_tokens=sys, max_output_tokens=out)


def trained_model(config: WSCConfig | None = None) -> CostModel:
    model = CostModel(config)
    for app, (inp, sys, out) in APPS.items():
        model.observe(app, 0, inp, sys, out)
    return model


def serve(s: Scheduler, n: int) -> dict[str, int]:
    """Admits n calls, each runs to its typical output at once; counts admissions per user."""
    served: dict[str, int] = {}
    for _ in range(n):
        c = s.pop_next(0.0, ALWAYS)
        assert c is not None
        served[c.user] = served.get(c.user, 0) + 1
        s.on_output_tokens(c.request_id, c.max_output_tokens, 0.0)
        s.on_finish(c.request_id, 0.0)
    return served


def test_typical_call_of_a_long_system_prompt_app_does_not_look_heavier() -> None:
    wsc, vtc = WSC(cost_model=trained_model()), VTC()
    for s in (wsc, vtc):
        for k in range(20):
            s.enqueue(typical("long_user", "longsys", f"L{k}"), 0.0)
            s.enqueue(typical("short_user", "short", f"S{k}"), 0.0)
    assert serve(wsc, 20) == {"long_user": 10, "short_user": 10}
    assert wsc.counters()["long_user"] == pytest.approx(wsc.counters()["short_user"]) == pytest.approx(10.0)
    by_vtc = serve(vtc, 20)
    assert by_vtc["short_user"] >= 4 * by_vtc.get("long_user", 0)  # VTC: 2500 vs 500 weighted tokens a call


def test_ewma_update_per_stage() -> None:
    model = CostModel(WSCConfig(ewma_alpha=0.25, w_in=1, w_sys=0.5, w_out=2))
    model.observe("a", 0, 100, 200, 50)  # 100 + 100 + 100 = 300: the first sample is taken as is
    assert model.lookup("a", 0) == (300.0, "stage")
    model.observe("a", 0, 100, 0, 0)  # 100: 300 + 0.25·(100 − 300) = 250
    assert model.lookup("a", 0) == (250.0, "stage")


def test_cold_start_falls_back_stage_app_global_default() -> None:
    model = CostModel(WSCConfig(ewma_alpha=0.5, default_cost=777.0))
    assert model.lookup("a", 0) == (777.0, "default")
    model.observe("a", 0, 100, 0, 0)  # cost 100
    model.observe("b", 0, 300, 0, 0)  # cost 300
    model.observe("a", 1, 500, 0, 0)  # cost 500
    assert model.lookup("a", 2) == (300.0, "app")  # a's EWMA over its stages: 100 → 300
    assert model.lookup("c", 0) == (350.0, "global")  # 100 → 200 → 350
    assert model.lookup("a", 1) == (500.0, "stage")
    assert model.lookup("a", 99) == model.lookup("a", 15)  # stages above max_stage share a bucket
    assert CostModel(WSCConfig(default_cost=0.0, min_cost=1.0)).cost("x", 0) == 1.0


def test_scheduler_learns_from_finished_calls_and_freezes_cost_at_admission() -> None:
    wsc = WSC(WSCConfig(default_cost=200.0, ewma_alpha=0.5))
    wsc.enqueue(call("u", "r1", inp=40, sys=10), 0.0)
    wsc.enqueue(call("u", "r2", inp=40, sys=10), 0.0)
    assert wsc.pop_next(0.0, ALWAYS) is not None
    assert wsc.counters()["u"] == pytest.approx(0.25)  # (40 + 10) / default 200
    wsc.on_output_tokens("r1", 25, 1.0)  # 25 · 2 / 200
    assert wsc.counters()["u"] == pytest.approx(0.5)
    assert wsc.pop_next(1.0, ALWAYS) is not None  # r2 admitted at N = 200 too: +0.25
    wsc.on_finish("r1", 2.0)  # learns 40 + 10 + 2·25 = 100 for (short, 0) from the reported tokens
    assert wsc.cost_model.lookup("short", 0) == (100.0, "stage")
    wsc.on_output_tokens("r2", 50, 3.0)  # r2 keeps its admission-time N = 200: +0.5 (not +1.0)
    assert wsc.counters()["u"] == pytest.approx(1.25)
    assert wsc.admission_charge(call("v", "r3", inp=40, sys=10)) == pytest.approx(0.5)  # new calls use N = 100


def _two_users(delta: float | None, b_head: Call) -> WSC:
    """a at counter 10 with a fresh interaction at its head, b at counter 13 with `b_head` at its head."""
    wsc = WSC(WSCConfig(default_cost=1.0, delta=delta))  # N = 1: charges are raw token counts
    for c in (call("a", "a0", inp=10), call("a", "a1", inp=1), call("b", "b0", inp=13, iid="bi"), b_head):
        wsc.enqueue(c, 0.0)
    assert [pop_id(wsc, 0.0) for _ in range(2)] == ["a0", "b0"]
    assert wsc.counters() == {"a": 10.0, "b": 13.0}
    return wsc


@pytest.mark.parametrize("head", [call("b", "b1", idx=1, iid="bi"), call("b", "b1", idx=0, iid="bi")])
def test_continuation_within_delta_is_preferred(head: Call) -> None:
    wsc = _two_users(5.0, head)  # call_index > 0, or call 0 of an interaction that already ran a call
    assert pop_id(wsc, 1.0) == "b1"
    assert wsc.continuation_picks == 1


def test_continuation_outside_delta_or_idle_interaction_is_not_preferred() -> None:
    assert pop_id(_two_users(2.0, call("b", "b1", idx=1, iid="bi")), 1.0) == "a1"
    fresh = _two_users(5.0, call("b", "b1", idx=0, iid="other"))  # a new interaction of b
    assert pop_id(fresh, 1.0) == "a1"
    idle = _two_users(5.0, call("b", "b1", idx=0, iid="bi"))
    assert pop_id(idle, 121.0) == "a1"


def test_delta_none_is_the_largest_admit_charge_seen() -> None:
    wsc = _two_users(None, call("b", "b1", idx=1, iid="bi"))
    assert wsc.delta == 13.0
    assert pop_id(wsc, 1.0) == "b1"


def test_lift_applies_in_normalised_units() -> None:
    wsc = WSC(cost_model=trained_model())
    wsc.enqueue(typical("a", "longsys", "a0"), 0.0)
    wsc.enqueue(typical("a", "longsys", "a1"), 0.0)
    wsc.pop_next(0.0, ALWAYS)
    wsc.enqueue(typical("b", "short", "b0"), 0.0)
    assert wsc.counters()["b"] == pytest.approx(wsc.counters()["a"]) == pytest.approx(2100 / 2500)


# ---- the bound analogue ----------------------------------------------------------------------------------
shapes = st.tuples(st.sampled_from(["x", "y", "z"]), st.integers(1, 32), st.integers(0, 64), st.integers(1, 24))


@settings(max_examples=40, deadline=None)
@given(patterns=st.lists(st.lists(shapes, min_size=1, max_size=5), min_size=2, max_size=4), extra=st.integers(0, 64))
def test_wsc_normalised_gap_bound(patterns: list[list[tuple[str, int, int, int]]], extra: int) -> None:
    """Gap ≤ 2·max(max admit charge, w_out·M/N_min) + δ while the cost model keeps learning."""
    budget = 32 + 64 + 24 + extra
    wsc = WSC(WSCConfig(ewma_alpha=0.3, default_cost=200.0))
    users = [f"u{i}" for i in range(len(patterns))]
    feeds = {u: itertools.cycle(p) for u, p in zip(users, patterns, strict=True)}
    serial, queued = itertools.count(), dict.fromkeys(users, 0)
    service, frozen_n = dict.fromkeys(users, 0.0), {}
    running: dict[str, list[int]] = {}
    used, n_min, admit_max = [0], float("inf"), 0.0

    def top_up(u: str) -> None:
        while queued[u] < 2:
            app, inp, sys, out = next(feeds[u])
            k = next(serial)
            c = Call(f"r{k}", u, app, f"{u}-{k // 3}", k % 3, inp, sys, out)
            wsc.enqueue(c, 0.0)
            queued[u] += 1

    for u in users:
        top_up(u)
    for step in range(100):
        now = float(step)
        while (c := wsc.pop_next(now, lambda c: used[0] + c.prompt_tokens + c.max_output_tokens <= budget)) is not None:
            queued[c.user] -= 1
            top_up(c.user)
            n = wsc.cost_model.cost(c.app, c.call_index)
            frozen_n[c.request_id] = (c.user, n)
            n_min, admit_max = min(n_min, n), max(admit_max, c.prompt_tokens / n)
            service[c.user] += c.prompt_tokens / n
            used[0] += c.prompt_tokens + c.max_output_tokens
            running[c.request_id] = [c.max_output_tokens, c.prompt_tokens + c.max_output_tokens]
        for rid in list(running):
            user, n = frozen_n[rid]
            wsc.on_output_tokens(rid, 1, now)
            service[user] += 2.0 / n
            running[rid][0] -= 1
            if running[rid][0] == 0:
                used[0] -= running.pop(rid)[1]
                wsc.on_finish(rid, now)
        bound = 2 * max(admit_max, 2.0 * budget / n_min) + wsc.delta
        assert max(service.values()) - min(service.values()) <= bound + 1e-9
        assert wsc.counters() == pytest.approx(service)
