"""The real pipeline admits through the FairServe throttler: tenant identity and interaction ids, a throttled
new interaction gets 429 with Retry-After while a continuation still runs, and per-tenant API keys on a
second gateway process (same engines, a Redis-backed fairserve throttler)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis
import yaml

from stageserve.serving.gateway.identity import key_digest
from stageserve.tools.redis_server import RedisServer, free_port
from stageserve.v1 import common_pb2, throttler_pb2_grpc

BODY = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 2}


def chat(base_url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{base_url}/chat/completions", json=BODY, headers=headers, timeout=120)


def report(pipeline, pending: int) -> None:
    """A load report as a prefill replica would send it: `pending` prompt tokens waiting for prefill."""
    with grpc.insecure_channel(pipeline.stages["throttler"][0]) as channel:
        load = common_pb2.StageLoad(stage="prefill", replica_id="test-load", pending_tokens=pending)
        throttler_pb2_grpc.ThrottlerStub(channel).ReportLoad(load, timeout=10)


def test_interaction_id_is_minted_and_returned(pipeline) -> None:
    r = chat(pipeline.openai_base_url, {"x-stageserve-user": "alice", "x-stageserve-app": "notes"})
    assert r.status_code == 200, r.text
    minted = r.headers["x-stageserve-interaction-id"]
    assert len(minted) >= 16
    again = chat(pipeline.openai_base_url, {"x-stageserve-interaction-id": minted, "x-stageserve-call-index": "1"})
    assert again.status_code == 200 and again.headers["x-stageserve-interaction-id"] == minted


def test_throttled_new_interaction_gets_429_but_continuations_run(pipeline) -> None:
    user = {"x-stageserve-user": "bob", "x-stageserve-app": "t429"}
    try:
        report(pipeline, 10**7)  # overloaded: far more queued prefill tokens than the batch budget
        first = chat(pipeline.openai_base_url, {**user, "x-stageserve-interaction-id": "bob-1"})
        assert first.status_code == 200, first.text  # first new interaction of the minute: within the limit
        report(pipeline, 10**7)
        second = chat(pipeline.openai_base_url, {**user, "x-stageserve-interaction-id": "bob-2"})
        assert second.status_code == 429, second.text
        assert int(second.headers["retry-after"]) >= 1
        assert second.json()["error"]["type"] == "rate_limit_error" and "t429" in second.json()["error"]["message"]
        report(pipeline, 10**7)
        cont = chat(pipeline.openai_base_url, {**user, "x-stageserve-interaction-id": "bob-1",
                                               "x-stageserve-call-index": "1"})
        assert cont.status_code == 200, cont.text  # mid-interaction: never rejected
    finally:
        report(pipeline, 0)
    calm = chat(pipeline.openai_base_url, {**user, "x-stageserve-interaction-id": "bob-3"})
    assert calm.status_code == 200, calm.text  # over the limit, but nothing is rejected without overload


KEYS = {"key-alice": {"user": "alice"}, "key-bot": {"user": "bot", "app": "search"}}


@pytest.fixture(scope="module")
def redis_throttler(tmp_path_factory) -> Iterator[tuple[int, RedisServer]]:
    """A fairserve throttler process whose state lives in a real redis-server."""
    server = RedisServer().start()
    port = free_port()
    path = Path(tmp_path_factory.mktemp("redis-throttler")) / "throttler.yaml"
    path.write_text(yaml.safe_dump({"throttler": {"port": port, "policy": "fairserve", "state": "redis",
                                                  "redis_url": server.url}}))
    proc = subprocess.Popen([sys.executable, "-m", "stageserve.serving.throttler", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        yield port, server
    finally:
        proc.terminate()
        proc.wait(15)
        server.stop()


@pytest.fixture(scope="module")
def keyed_gateway(pipeline, redis_throttler, tmp_path_factory) -> Iterator[str]:
    """A second gateway process with per-tenant API keys, in front of the pipeline's engines and a
    Redis-backed fairserve throttler."""
    stages = {}
    for stage, addresses in pipeline.stages.items():
        if stage == "gateway" or not addresses:
            continue
        stages[stage] = {"port": int(addresses[0].rsplit(":", 1)[1])}
        if stage not in ("throttler",):
            stages[stage]["replicas"] = len(addresses)
    stages["throttler"] = {"port": redis_throttler[0]}
    http_port = free_port()
    config = {
        **stages,
        "gateway": {
            "http_port": http_port,
            "grpc_port": free_port(),
            "api_keys": {key_digest(k): v for k, v in KEYS.items()},
            "report_loads": False,
        },
    }
    path = Path(tmp_path_factory.mktemp("keyed")) / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "stageserve.serving.gateway", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_http(http_port, proc)
        yield f"http://127.0.0.1:{http_port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def _wait_http(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 180.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gateway did not serve on {port}")


def test_api_keys_bind_requests_to_their_tenant(keyed_gateway: str, redis_throttler) -> None:
    assert chat(keyed_gateway, {}).status_code == 401
    bad = chat(keyed_gateway, {"authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    ok = chat(keyed_gateway, {"authorization": "Bearer key-alice", "x-stageserve-app": "notes"})
    assert ok.status_code == 200, ok.text
    client = redis.Redis.from_url(redis_throttler[1].url)  # admitted through the Redis-backed throttler:
    iid = ok.headers["x-stageserve-interaction-id"]  # its interaction and alice's window live in Redis
    assert client.exists(f"stageserve:throttler:ia:{iid}") and client.zcard("stageserve:throttler:rua:alice|notes") == 1
    same = chat(keyed_gateway, {"authorization": "Bearer key-alice", "x-stageserve-user": "alice"})
    assert same.status_code == 200
    other = chat(keyed_gateway, {"authorization": "Bearer key-alice", "x-stageserve-user": "mallory"})
    assert other.status_code == 403 and "x-stageserve-user" in other.json()["error"]["message"]
    app = chat(keyed_gateway, {"authorization": "Bearer key-bot", "x-stageserve-app": "notes"})
    assert app.status_code == 403 and "x-stageserve-app" in app.json()["error"]["message"]


def test_redis_killed_under_load_loses_no_request(keyed_gateway: str, redis_throttler) -> None:
    """Redis dies while calls are being admitted and served: every call still gets its answer (the throttler
    decides from local state), and calls after the crash are admitted too. Runs last: it kills the module's Redis."""
    from concurrent.futures import ThreadPoolExecutor

    headers = {"authorization": "Bearer key-alice"}
    with ThreadPoolExecutor(max_workers=6) as pool:
        before = [pool.submit(chat, keyed_gateway, {**headers, "x-stageserve-interaction-id": f"load-{i}"})
                  for i in range(6)]
        time.sleep(0.5)  # calls are in admission or in the engines now
        redis_throttler[1].kill()
        after = [pool.submit(chat, keyed_gateway, {**headers, "x-stageserve-interaction-id": f"post-{i}"})
                 for i in range(6)]
        codes = [f.result().status_code for f in before + after]
    assert codes == [200] * 12, codes
