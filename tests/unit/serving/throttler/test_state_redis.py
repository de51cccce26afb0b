"""Redis-backed admission against a real redis-server (started here): same decisions as the pure policies,
shared counters, and an outage: local decisions, then a resync when Redis returns."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from stageserve.policy.fairness.oit import AppLimits
from stageserve.policy.fairness.rpm import RPMConfig
from stageserve.policy.fairness.throttle import ThrottleConfig, make_admission
from stageserve.policy.fairness.types import Admit, Call, Reject
from stageserve.serving.throttler.state_redis import RedisAdmission, RedisState
from stageserve.tools.redis_server import RedisServer

LIMITS = {"chat": AppLimits(user_per_min=2, app_per_min=5, max_calls_per_interaction=4)}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def shared(server: RedisServer, prefix: str, policy: str = "fairserve") -> RedisAdmission:
    cfg = ThrottleConfig(policy=policy, limits=LIMITS, rpm=RPMConfig(user_rpm=3, app_rpm=7))
    return RedisAdmission(RedisState(server.url, prefix), make_admission(cfg), LIMITS, AppLimits())  # type: ignore[arg-type]


def script(seed: int, n: int = 150) -> list[tuple[Call, float, bool]]:
    """Random calls: new and continuing interactions, unknown ids with call_index > 0, idle gaps, overload on/off."""
    rng = random.Random(seed)
    now, out, live = 1000.0, [], []
    for i in range(n):
        now += rng.choice([0.2, 1.0, 5.0, 30.0, 130.0]) if rng.random() < 0.3 else 0.5
        kind = rng.random()
        if kind < 0.4 and live:
            iid, idx = rng.choice(live)
            live.remove((iid, idx))
            live.append((iid, idx + 1))
            c = Call(f"r{i}", iid.split(".")[0], "chat", iid, idx + 1)
        elif kind < 0.5:
            c = Call(f"r{i}", f"u{rng.randint(0, 2)}", "chat", f"ghost{i}", rng.randint(1, 6))
        else:
            user = f"u{rng.randint(0, 2)}"
            c = Call(f"r{i}", user, "chat", f"{user}.{i}", 0)
            live.append((c.interaction_id, 0))
        out.append((c, now, rng.random() < 0.7))
    return out


@pytest.mark.parametrize("policy", ["fairserve", "rpm"])
def test_redis_decides_exactly_as_the_pure_policy(redis_server: RedisServer, policy: str) -> None:
    for seed in range(3):
        redis_adm = shared(redis_server, f"eq:{policy}:{seed}", policy)
        pure = make_admission(ThrottleConfig(policy=policy, limits=LIMITS, rpm=RPMConfig(user_rpm=3, app_rpm=7)))
        assert pure is not None
        rejected = 0
        for call, now, overloaded in script(seed):
            a, b = redis_adm.check(call, now, overloaded), pure.check(call, now, overloaded)
            assert type(a) is type(b), (call, now, a, b)
            if isinstance(a, Reject):
                assert isinstance(b, Reject)
                rejected += 1
                assert a.retry_after_s == pytest.approx(b.retry_after_s) and a.reason == b.reason
        assert rejected > 0  # the script does reach the limits


def test_counters_are_shared_between_replicas(redis_server: RedisServer) -> None:
    one, two = shared(redis_server, "ctr"), shared(redis_server, "ctr")
    one.add_deltas({"alice": 10.0, "bob": 2.5})
    assert one.prefetch([], 1.0, False, ["alice"]) == {"alice": 10.0}
    two.add_deltas({"alice": 1.0})
    assert two.prefetch([], 1.0, False, ["alice", "bob", "carol"]) == {"alice": 11.0, "bob": 2.5}


def test_outage_decides_locally_then_resyncs(redis_server: RedisServer) -> None:
    adm = shared(redis_server, "outage")
    assert isinstance(adm.check(Call("a", "u", "chat", "i1"), 10.0, True), Admit)
    redis_server.kill()
    try:
        # Redis is gone: the local OIT (fed all along) still knows i1 and the window, and decides alone
        assert isinstance(adm.check(Call("b", "u", "chat", "i1", 1), 11.0, True), Admit)
        assert adm.degraded and adm.outages == 1
        assert isinstance(adm.check(Call("c", "u", "chat", "i2"), 12.0, True), Admit)
        assert adm.check(Call("x", "u", "chat", "i1", 2), 12.5, True) == Admit(reason="oit: continuation")
        third = adm.check(Call("d", "u", "chat", "i3"), 13.0, True)
        assert isinstance(third, Reject)  # 2 starts/min for u: the local window counts i1 and i2
        adm.add_deltas({"u": 4.0})
    finally:
        redis_server.start()
    assert isinstance(adm.check(Call("e", "u", "chat", "i2", 1), 20.0, True), Admit)  # retried after 1 s: back
    assert not adm.degraded
    client = adm.state.client
    assert client.exists(adm.state.key("ia", "i1")) and client.exists(adm.state.key("ia", "i2"))
    assert adm.lost_state  # Redis came back empty: the servicer re-pushes full counters instead of deltas
    other = shared(redis_server, "outage")  # a replica that never saw the outage now sees the window
    assert isinstance(other.check(Call("f", "u", "chat", "i9"), 21.0, True), Reject)
