"""The throttler as real processes: two replicas sharing a real redis-server decide as one, a Redis crash
mid-run does not stop serving, queued calls are dispatched as capacity frees, load reports arrive."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from stageserve.serving.common.config import load_config
from stageserve.serving.gateway.throttling import forward_loads
from stageserve.serving.throttler.servicer import ThrottlerServicer
from stageserve.tools.redis_server import RedisServer, free_port
from stageserve.v1 import common_pb2, throttler_pb2, throttler_pb2_grpc

R = throttler_pb2.AdmitResponse
LIMITS = {"chat": {"user_per_min": 2, "app_per_min": 6}}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


class ThrottlerProcess:
    def __init__(self, tmp: Path, **throttler: object) -> None:
        self.port = free_port()
        path = tmp / f"throttler-{self.port}.yaml"
        path.write_text(yaml.safe_dump({"throttler": {"port": self.port, "max_running_calls": 0, **throttler}}))
        cmd = [sys.executable, "-m", "stageserve.serving.throttler", "--config", str(path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(self.port, self.proc)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"throttler exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"throttler did not listen on {port}")


def admit_request(rid: str, user: str, iid: str, idx: int = 0, app: str = "chat") -> throttler_pb2.AdmitRequest:
    tenant = common_pb2.TenantKey(user=user, app=app, interaction_id=iid, call_index=idx)
    expected = common_pb2.TokenCounts(input=10, output=4)
    return throttler_pb2.AdmitRequest(request_id=rid, tenant=tenant, expected=expected)


def overload(stub: throttler_pb2_grpc.ThrottlerStub, on: bool) -> None:
    load = common_pb2.StageLoad(stage="prefill", replica_id="test", pending_tokens=10**7 if on else 0)
    stub.ReportLoad(load, timeout=5)


SCRIPT = [  # (user, interaction, call index): new interactions, continuations, over the 2/min user limit
    ("a", "a1", 0), ("a", "a2", 0), ("a", "a1", 1), ("a", "a3", 0), ("b", "b1", 0), ("a", "a2", 1),
    ("b", "b2", 0), ("b", "b3", 0), ("c", "c1", 0), ("c", "c2", 0), ("c", "c3", 0), ("b", "b1", 1),
    ("a", "a4", 0), ("c", "c1", 1), ("d", "d1", 0),
]


def run_script(stubs: list[throttler_pb2_grpc.ThrottlerStub], tag: str) -> list[tuple[int, str]]:
    out = []
    for k, (user, iid, idx) in enumerate(SCRIPT):
        answer = stubs[k % len(stubs)].Admit(admit_request(f"{tag}-{k}", user, f"{tag}-{iid}", idx), timeout=5)
        out.append((answer.decision, answer.reason))
    return out


def test_two_replicas_sharing_redis_decide_as_one(redis_server: RedisServer, tmp_path: Path) -> None:
    common = {"policy": "fairserve", "state": "redis", "redis_url": redis_server.url, "limits": LIMITS}
    one = ThrottlerProcess(tmp_path, redis_prefix="single", **common)
    a = ThrottlerProcess(tmp_path, redis_prefix="pair", **common)
    b = ThrottlerProcess(tmp_path, redis_prefix="pair", **common)
    try:
        chans = [grpc.insecure_channel(p.address) for p in (one, a, b)]
        s_one, s_a, s_b = (throttler_pb2_grpc.ThrottlerStub(c) for c in chans)
        overload(s_one, True)
        overload(s_a, True)  # only replica a hears the load report: b learns the overload through Redis
        single = run_script([s_one], "t")
        paired = run_script([s_a, s_b], "t")
        assert paired == single
        decisions = [d for d, _ in single]
        assert decisions.count(R.REJECTED) >= 3 and decisions.count(R.ADMITTED) >= 8
        for (_, iid, idx), (d, _) in zip(SCRIPT, single, strict=True):
            if idx > 0:
                assert d == R.ADMITTED, iid  # never rejected mid-interaction
        for c in chans:
            c.close()
    finally:
        for p in (one, a, b):
            p.stop()


def test_redis_killed_mid_run_serving_continues(tmp_path: Path) -> None:
    server = RedisServer().start()
    proc = ThrottlerProcess(tmp_path, policy="fairserve", state="redis", redis_url=server.url, limits=LIMITS)
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = throttler_pb2_grpc.ThrottlerStub(channel)
            overload(stub, True)
            assert stub.Admit(admit_request("k0", "u", "i0"), timeout=5).decision == R.ADMITTED
            server.kill()
            answers = [stub.Admit(admit_request(f"k{i}", "u", f"i{i}"), timeout=5) for i in range(1, 4)]
            # the local state knew i0: one more start fits the 2/min limit, then rejections with retry-after
            assert [a.decision for a in answers] == [R.ADMITTED, R.REJECTED, R.REJECTED]
            assert answers[2].retry_after_s >= 1.0
            assert stub.Admit(admit_request("k9", "u", "i0", 1), timeout=5).decision == R.ADMITTED
            server.start()
            time.sleep(1.2)  # the next decision retries Redis and restores the windows there
            assert stub.Admit(admit_request("k10", "v", "v0"), timeout=5).decision == R.ADMITTED
            assert server_has_window(server, "u")
    finally:
        proc.stop()
        server.stop()


def server_has_window(server: RedisServer, user: str) -> bool:
    import redis

    client = redis.Redis.from_url(server.url)
    return client.zcard(f"stageserve:throttler:rua:{user}|chat") == 2


def test_queued_calls_are_dispatched_in_fair_order_as_capacity_frees() -> None:
    async def run() -> None:
        config = load_config(overrides={"throttler": {"policy": "fairserve", "max_running_calls": 1}})
        servicer = ThrottlerServicer(config)
        server = grpc.aio.server()
        throttler_pb2_grpc.add_ThrottlerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = throttler_pb2_grpc.ThrottlerStub(channel)
                assert (await stub.Admit(admit_request("h0", "heavy", "h0"))).decision == R.ADMITTED
                queued = [await stub.Admit(admit_request(r, u, r)) for r, u in (("h1", "heavy"), ("l1", "light"))]
                assert [q.decision for q in queued] == [R.QUEUED, R.QUEUED] and queued[1].queue_position == 2
                waits = [asyncio.ensure_future(stub.AwaitAdmission(throttler_pb2.AwaitRequest(request_id=r)))
                         for r in ("h1", "l1")]
                await stub.ReportTokens(throttler_pb2.TokenReport(request_id="h0",
                                                                  counts=common_pb2.TokenCounts(output=4)))
                await asyncio.sleep(0.05)
                assert not any(w.done() for w in waits)
                done_h0 = throttler_pb2.ReleaseRequest(request_id="h0", counts=common_pb2.TokenCounts(output=4))
                await stub.Release(done_h0)
                done, _ = await asyncio.wait(waits, timeout=5, return_when=asyncio.FIRST_COMPLETED)
                assert [w for w in waits if w in done] == [waits[1]]  # the light user goes first
                assert waits[1].result().decision == R.ADMITTED
                waits[0].cancel()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Admit(throttler_pb2.AdmitRequest())
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
        finally:
            await server.stop(0)

    asyncio.run(run())


def kv(usage: float) -> common_pb2.StageLoad:
    return common_pb2.StageLoad(kv_cache_usage=usage)


def test_gateway_forwarded_loads_drive_overload() -> None:
    async def run() -> None:
        config = load_config(overrides={"throttler": {"policy": "fairserve"}})
        servicer = ThrottlerServicer(config)
        server = grpc.aio.server()
        throttler_pb2_grpc.add_ThrottlerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        class Polled:  # what the gateway's ReplicaSet keeps after GetLoad: the raw StageLoad per address
            def __init__(self, stage: str, raw: dict[str, common_pb2.StageLoad]) -> None:
                self.stage, self.raw = stage, raw

        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = throttler_pb2_grpc.ThrottlerStub(channel)
                await forward_loads(stub, [Polled("decode", {"d:1": kv(0.97), "d:2": kv(0.95)})])
                assert set(servicer.loads) == {"decode/d:1", "decode/d:2"} and servicer.overloaded
                await forward_loads(stub, [Polled("decode", {"d:1": kv(0.1), "d:2": kv(0.2)})])
                assert not servicer.overloaded
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ReportLoad(common_pb2.StageLoad(kv_cache_usage=1.5))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await server.stop(0)

    asyncio.run(run())
