"""`stageserve bench throttler`: admission decisions per second and decision latency with Redis on loopback.

Two measurements, side by side in one run, against one real `redis-server` (started here on a free port
unless `--redis-url` is given), with the fairserve policy under overload (so every new interaction is
checked against its sliding windows) and a mix of new interactions and continuations:
1. state backend: `--procs` client processes, each deciding batches of `--batch` calls with one Lua round
   trip (`RedisAdmission.prefetch`); also `--batch 1` for comparison. A decision's latency is the round
   trip of the batch it was in.
2. the servicer's decision path in-process (Throttle state machine + Redis, one flush per batch), no gRPC;
3. gRPC service: a throttler process (state: redis) and `--concurrency` concurrent asyncio clients doing
   Admit then Release; a decision's latency is the Admit RPC's (the servicer batches concurrent Admits).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stageserve.policy.fairness.oit import AppLimits
from stageserve.policy.fairness.throttle import ThrottleConfig, make_admission
from stageserve.policy.fairness.types import Call


def _calls(worker: int, start: int, n: int) -> list[Call]:
    out = []
    for i in range(start, start + n):
        user = f"u{(i * 7 + worker) % 500}"
        iid = f"w{worker}-i{i // 3}"  # every third call starts an interaction, the others continue it
        out.append(Call(f"w{worker}-r{i}", user, f"app{i % 4}", iid, i % 3, 200, 100, 64))
    return out


def _backend_worker(url: str, prefix: str, batch: int, duration_s: float, worker: int, queue: mp.Queue) -> None:
    from stageserve.serving.throttler.state_redis import RedisAdmission, RedisState

    limits = {f"app{a}": AppLimits(user_per_min=30.0, app_per_min=5000.0) for a in range(4)}
    cfg = ThrottleConfig(policy="fairserve", limits=limits)
    adm = RedisAdmission(RedisState(url, prefix), make_admission(cfg), limits, AppLimits())
    lat: list[float] = []
    n = 0
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        calls = _calls(worker, n, batch)
        t0 = time.perf_counter()
        adm.prefetch(calls, time.time(), True, [c.user for c in calls[:8]])
        dt = time.perf_counter() - t0
        lat.extend([dt] * batch)
        adm._verdicts.clear()
        n += batch
    queue.put((n, lat, adm.degraded))


def bench_backend(url: str, procs: int, batch: int, duration_s: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    prefix = f"bench:{os.getpid()}:{batch}"
    args = [(url, prefix, batch, duration_s, w, queue) for w in range(procs)]
    workers = [ctx.Process(target=_backend_worker, args=a) for a in args]
    for w in workers:
        w.start()
    results = [queue.get(timeout=duration_s + 60) for _ in workers]
    for w in workers:
        w.join()
    total = sum(r[0] for r in results)
    lat = sorted(x for r in results for x in r[1])
    return _stats(f"backend batch={batch} procs={procs}", total, duration_s, lat)


def _stats(name: str, total: int, duration_s: float, lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q / 100 * len(lat)))] * 1000 if lat else float("nan")

    return {"name": name, "decisions": total, "decisions_per_s": total / duration_s,  # type: ignore[dict-item]
            "p50_ms": pct(50), "p99_ms": pct(99)}


def bench_servicer(url: str, batch: int, duration_s: float) -> dict[str, float]:
    """The throttler servicer's decision path in-process (Throttle + Redis, batched flushes), without gRPC."""
    from stageserve.serving.common.config import load_config
    from stageserve.serving.throttler.servicer import ThrottlerServicer

    cfg = load_config(overrides={"throttler": {
        "policy": "fairserve", "state": "redis", "redis_url": url, "redis_prefix": f"bench:svc:{os.getpid()}",
        "max_running_calls": 0, "limits": {f"app{a}": {"user_per_min": 30.0} for a in range(4)}}})

    async def run() -> tuple[int, list[float]]:
        servicer = ThrottlerServicer(cfg)
        lat: list[float] = []
        n = 0
        end = time.perf_counter() + duration_s
        while time.perf_counter() < end:
            calls = _calls(0, n, batch)
            t0 = time.perf_counter()
            await asyncio.gather(*(servicer._decide(c) for c in calls))
            lat.extend([time.perf_counter() - t0] * batch)
            for c in calls:
                servicer._release(c.request_id, 64)
            n += batch
        return n, lat

    total, lat = asyncio.run(run())
    return _stats(f"servicer in-process, {batch} concurrent Admits", total, duration_s, lat)


async def _grpc_clients(address: str, concurrency: int, duration_s: float) -> tuple[int, list[float]]:
    import grpc

    from stageserve.v1 import common_pb2, throttler_pb2, throttler_pb2_grpc

    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    stubs = [throttler_pb2_grpc.ThrottlerStub(c) for c in channels]
    lat: list[float] = []
    count = [0]
    end = time.perf_counter() + duration_s

    async def client(k: int) -> None:
        stub = stubs[k % len(stubs)]
        i = 0
        while time.perf_counter() < end:
            rid = f"c{k}-{i}"
            tenant = common_pb2.TenantKey(user=f"u{k % 200}", app=f"app{k % 4}", interaction_id=f"c{k}-i{i // 3}",
                                          call_index=i % 3)
            req = throttler_pb2.AdmitRequest(request_id=rid, tenant=tenant,
                                             expected=common_pb2.TokenCounts(input=200, system=100, output=64))
            t0 = time.perf_counter()
            answer = await stub.Admit(req)
            lat.append(time.perf_counter() - t0)
            count[0] += 1
            if answer.decision == throttler_pb2.AdmitResponse.ADMITTED:
                await stub.Release(throttler_pb2.ReleaseRequest(request_id=rid,
                                                                counts=common_pb2.TokenCounts(output=64)))
            i += 1

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    for c in channels:
        await c.close()
    return count[0], lat


def bench_grpc(url: str, concurrency: int, duration_s: float) -> dict[str, float]:
    from stageserve.tools.redis_server import free_port

    port = free_port()
    cfg = {"throttler": {"port": port, "policy": "fairserve", "state": "redis", "redis_url": url,
                         "redis_prefix": f"bench:grpc:{os.getpid()}", "max_running_calls": 0,
                         "limits": {f"app{a}": {"user_per_min": 30.0} for a in range(4)}}}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    proc = subprocess.Popen([sys.executable, "-m", "stageserve.serving.throttler", "--config", f.name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        total, lat = asyncio.run(_grpc_clients(f"127.0.0.1:{port}", concurrency, duration_s))
    finally:
        proc.terminate()
        proc.wait(10)
        Path(f.name).unlink()
    return _stats(f"gRPC Admit concurrency={concurrency}", total, duration_s, lat)


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    import socket

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            time.sleep(0.3)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"throttler did not listen on port {port}")


def add_bench_throttler_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("throttler", help="throttler decisions/s and p99 decision latency with Redis on loopback")
    p.add_argument("--redis-url", default=None, help="use this Redis (default: start redis-server on a free port)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--procs", type=int, default=2, help="client processes for the backend measurement")
    p.add_argument("--batch", type=int, default=64, help="decisions per Lua round trip")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent gRPC clients")
    p.add_argument("--json", default=None)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from stageserve.tools.redis_server import RedisServer

    server = None if args.redis_url else RedisServer().start()
    url = args.redis_url or server.url  # type: ignore[union-attr]
    try:
        rows = [
            bench_backend(url, args.procs, args.batch, args.duration),
            bench_backend(url, args.procs, 1, args.duration),
            bench_servicer(url, args.batch, args.duration),
            bench_grpc(url, args.concurrency, args.duration),
        ]
    finally:
        if server is not None:
            server.stop()
    print("| measurement | decisions | decisions/s | p50 (ms) | p99 (ms) |\n|---|---|---|---|---|")
    for r in rows:
        rate = f"{r['decisions_per_s']:,.0f}"
        print(f"| {r['name']} | {r['decisions']} | {rate} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
