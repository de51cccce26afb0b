"""The gateway follows `discovery: dns`: real decode stage processes on 127.0.0.2 / 127.0.0.3 (same port, as pods
behind a headless Service), a resolver function standing in for the cluster DNS (none exists here)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest
import yaml

from stageserve.serving.common.config import load_config
from stageserve.serving.common.convert import FORMAT_IDS
from stageserve.serving.common.discovery import Discovery
from stageserve.serving.common.errors import Unavailable
from stageserve.serving.gateway.rediscover import rediscover
from stageserve.serving.gateway.replicas import ReplicaSet
from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

PODS = ("127.0.0.2", "127.0.0.3")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def decode_pods(tmp_path_factory):
    """One real decode process per pod IP, all on the same gRPC port; -> (port, {ip: Popen})."""
    port = _free_port()
    for ip in PODS:  # the port must be free on every pod address
        with socket.socket() as s:
            s.bind((ip, port))
    procs = {}
    for ip in PODS:
        cfg = {"host": ip, "decode": {"port": port, "metrics_port": _free_port(), "kv_cache_memory_bytes": 64 << 20}}
        path = tmp_path_factory.mktemp("pod") / "stageserve.yaml"
        path.write_text(yaml.safe_dump(cfg))
        procs[ip] = subprocess.Popen(
            [sys.executable, "-m", "stageserve.serving.decode", "--config", str(path), "--replica", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    try:
        yield port, procs
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)


async def _until_healthy(replicas: ReplicaSet, address: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not replicas.loads[address].healthy:
        assert time.monotonic() < deadline, f"decode pod {address} did not come up"
        await asyncio.sleep(0.2)
        await replicas.refresh()


class _Core:
    """The parts of a GatewayCore that rediscover() syncs (decode here; the others stay static)."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery
        self.decode = ReplicaSet("decode", discovery.addresses("decode"), decode_pb2_grpc.DecodeStub)


def test_gateway_replica_set_follows_dns_answers_as_pods_come_and_go(decode_pods):
    port, procs = decode_pods
    answer: list[str] = [PODS[0]]

    async def resolver(name: str) -> list[str]:
        assert name == "llm-decode.ml.svc"
        return list(answer)

    config = load_config(overrides={"gateway": {"discovery_interval_s": 0.0},
                                    "decode": {"discovery": "dns", "service": "llm-decode.ml.svc", "port": port}})
    first, second = (f"{ip}:{port}" for ip in PODS)

    async def scenario() -> None:
        core = _Core(Discovery(config, resolver))
        assert core.decode.stubs == {}  # nothing resolved yet: no localhost fallback
        t = 0.0

        async def tick() -> dict[str, list[str]]:
            nonlocal t
            t += 1.0
            changed = await rediscover(core, t)
            await core.decode.refresh()
            return changed

        assert await tick() == {"decode": [first]}
        await _until_healthy(core.decode, first)
        assert core.decode.pick(10) == first

        answer.append(PODS[1])  # a replica scaled up: picked up on the next poll, with its own stub
        assert await tick() == {"decode": [first, second]}
        await _until_healthy(core.decode, second)
        assert set(core.decode.formats[second])  # its real load report (KV formats) arrived

        # a request in flight on the first pod: decode holds it waiting for prefill's KV
        sampling = common_pb2.SamplingParams(max_tokens=4)
        request = decode_pb2.DecodeRequest(
            request_id="inflight", prompt_token_ids=[1, 2], sampling=sampling, kv_format=FORMAT_IDS["bf16"]
        )
        call = core.decode.stubs[first].Generate(request)
        await asyncio.sleep(0.5)
        assert not call.done(), (await call.code(), await call.details()) if call.done() else None
        answer.remove(PODS[0])  # the first pod leaves the Service
        assert await tick() == {"decode": [second]}
        assert set(core.decode.stubs) == {second} and set(core.decode.loads) == {second}
        assert {core.decode.pick(10) for _ in range(3)} == {second}
        assert not call.done()  # the dropped replica's in-flight call is untouched
        call.cancel()

        procs[PODS[1]].terminate()  # the pod dies before DNS notices: it stays listed but is never picked
        procs[PODS[1]].wait(timeout=30)
        await tick()
        assert not core.decode.loads[second].healthy
        with pytest.raises(Unavailable, match="no healthy decode replica"):
            core.decode.pick(10)

    asyncio.run(scenario())
