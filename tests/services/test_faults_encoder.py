"""Encoder deaths under a real pipeline (2 encoder replicas): the images are re-encoded on the other replica.

kill -9 the encoder (a) while it encodes a request's images (Encode fails) or (b) after it answered Encode but
before prefill fetched the embeddings (prefill is held with SIGSTOP; its FetchEmbeddings then fails). Either way
the gateway migrates the whole attempt, Encode included, and the greedy output equals an uninterrupted run.
Afterwards every live replica's pending image tokens and prefill/decode load return to zero.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import threading
import time

import grpc
import httpx
import pytest

from stageserve.client import Client
from stageserve.v1 import common_pb2, encoder_pb2_grpc
from tests.services.test_encoder_pipeline import png
from tests.services.test_faults import assert_drained

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def enc():
    """gateway -> 2 encoders -> 1 prefill -> 1 decode, and its supervisor (to kill and restart replicas)."""
    from stageserve.serving.supervisor import Supervisor, free_port_config

    config = free_port_config(
        encoder={"replicas": 2},
        prefill={"kv_cache_memory_bytes": 128 << 20},
        decode={"kv_cache_memory_bytes": 128 << 20},
        gateway={"load_poll_interval_s": 0.2, "migration_wait_s": 60.0},
    )
    supervisor = Supervisor(config, startup_timeout_s=600.0)
    endpoints = supervisor.start()
    restarts: list[threading.Thread] = []
    try:
        yield supervisor, endpoints, restarts
    finally:
        for thread in restarts:
            thread.join(timeout=300)
        supervisor.stop()


def _chat(endpoints, images: list[bytes]) -> list[int]:
    messages = [{"role": "user", "content": "What is in these pictures?", "images": images}]
    with Client(endpoints.gateway_grpc, timeout=240) as client:
        out = client.chat(messages, max_tokens=MAX_TOKENS, ignore_eos=True)
    return list(out.token_ids)


def _metric(url: str, name: str) -> float:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return 0.0
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _migrations(endpoints) -> float:
    return _metric(endpoints.metrics["gateway"][0], "stageserve_gateway_migrations_total")


def _encoded(endpoints) -> list[float]:
    return [_metric(u, "stageserve_encoder_image_tokens_total") for u in endpoints.metrics["encoder"]]


def _pending(sup) -> list[int | None]:
    async def main() -> list[int | None]:
        out: list[int | None] = []
        for address in sup.config.addresses("encoder"):
            async with grpc.aio.insecure_channel(address) as channel:
                try:
                    load = await encoder_pb2_grpc.EncoderStub(channel).GetLoad(common_pb2.LoadRequest(), timeout=2.0)
                    out.append(int(load.pending_image_tokens))
                except grpc.aio.AioRpcError:
                    out.append(None)
        return out

    return asyncio.run(main())


def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _restart_later(sup, restarts, replica: int) -> None:
    thread = threading.Thread(target=sup.restart, args=("encoder", replica), daemon=True)
    thread.start()
    restarts.append(thread)


def _assert_encoders_idle(sup) -> None:
    _until(lambda: True if all(p in (None, 0) for p in _pending(sup)) else None, 30.0, "no pending image tokens")


def test_encoder_killed_after_encode_before_fetch_is_re_encoded(enc):
    sup, endpoints, restarts = enc
    images = [png(40, 32, seed=501)]
    prefill = sup.process("prefill", 0).pid
    before, migrations = _encoded(endpoints), _migrations(endpoints)
    os.kill(prefill, signal.SIGSTOP)  # prefill cannot fetch the embeddings until we let it go
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_chat, endpoints, images)

            def encoded_by() -> int | None:
                now = _encoded(endpoints)
                return next((i for i, (a, b) in enumerate(zip(now, before, strict=True)) if a > b), None)

            killed = _until(encoded_by, 120.0, "an encoder to answer Encode")
            sup.kill("encoder", killed)  # its handles are now dangling
            os.kill(prefill, signal.SIGCONT)
            got = pending.result(timeout=240)
    finally:
        os.kill(prefill, signal.SIGCONT)
    assert _migrations(endpoints) >= migrations + 1  # prefill's FetchEmbeddings failed: the attempt was re-run
    _restart_later(sup, restarts, killed)
    assert_drained(sup)
    _assert_encoders_idle(sup)
    restarts.pop().join(timeout=300)
    assert got == _chat(endpoints, images)  # uninterrupted run (both encoders up again)


def test_encoder_killed_while_encoding_is_re_encoded(enc):
    sup, endpoints, restarts = enc
    images = [png(400, 300, seed=600 + i) for i in range(4)]  # several tiles each: encoding takes a while
    migrations = _migrations(endpoints)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_chat, endpoints, images)

        def busy() -> int | None:
            return next((i for i, p in enumerate(_pending(sup)) if p), None)

        killed = _until(busy, 120.0, "an encoder with pending image tokens")
        sup.kill("encoder", killed)
        got = pending.result(timeout=240)
    assert _migrations(endpoints) >= migrations + 1
    _restart_later(sup, restarts, killed)
    assert_drained(sup)
    _assert_encoders_idle(sup)
    restarts.pop().join(timeout=300)
    assert got == _chat(endpoints, images)


def test_an_image_request_waits_for_a_healthy_encoder_before_its_retry():
    """The retry of an image request re-encodes: it waits (gateway.migration_wait_s) until some encoder is
    healthy again; a text-only request does not wait for encoders."""
    from stageserve.core.sampling import SamplingParams
    from stageserve.serving.common.errors import Timeout, Unavailable
    from stageserve.serving.gateway.http import GenerateDelta, HttpGenerateRequest, TenantHeaders
    from stageserve.serving.gateway.migration import Migrator

    refreshes: list[int] = []

    async def refresh() -> None:
        refreshes.append(1)

    async def attempt(req):
        if req.request_id == "r":
            raise Unavailable("encoder died")
        yield GenerateDelta("x", [1], True, "length", 3, 1, 0)

    def run(images: tuple[bytes, ...], healthy_after: int, wait_s: float = 5.0) -> list[GenerateDelta]:
        refreshes.clear()
        migrator = Migrator(2, wait_s, refresh, lambda: True, has_encoder=lambda: len(refreshes) > healthy_after)
        request = HttpGenerateRequest("r", [7, 8, 9], SamplingParams(max_tokens=1), TenantHeaders("u", "a", "i", 0),
                                      images=images)

        async def main():
            return [d async for d in migrator.run(request, attempt)]

        return asyncio.run(main())

    assert [d.token_ids for d in run((b"png",), healthy_after=2)] == [[1]]
    assert len(refreshes) == 3  # polled until an encoder came back, then retried
    assert [d.token_ids for d in run((), healthy_after=10**6)] == [[1]] and len(refreshes) == 1
    with pytest.raises(Timeout, match="encoder"):
        run((b"png",), healthy_after=10**6, wait_s=0.3)
