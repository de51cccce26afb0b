"""Stage deaths under a real pipeline (2 prefill + 2 decode processes): nothing lost, everything freed.

kill -9 the decode replica serving a long stream: the gateway migrates it by token replay and the client's
stream is identical to an uninterrupted run (greedy and seeded). kill -9 the prefill running a long prompt:
decode drops the partial KV and the gateway retries elsewhere. Throttler down: fail-open. After each fault
every replica's load report (running, waiting, pending tokens, KV usage) returns to zero.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import pytest

from stageserve.v1 import common_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, prefill_pb2_grpc

LONG = 64  # tokens: long enough to kill decode mid-stream on CPU


@pytest.fixture(scope="module")
def chaos():
    """A pipeline with two prefill and two decode replicas, and its supervisor (to kill and restart them)."""
    from stageserve.serving.supervisor import Supervisor, free_port_config

    config = free_port_config(
        prefill={"replicas": 2, "kv_cache_memory_bytes": 128 << 20},
        decode={"replicas": 2, "kv_cache_memory_bytes": 128 << 20},
        gateway={"load_poll_interval_s": 0.2, "migration_wait_s": 60.0},
    )
    supervisor = Supervisor(config, startup_timeout_s=300.0)
    supervisor.start()
    supervisor.restarts = []  # background restarts: the next test runs while a killed replica comes back
    try:
        yield supervisor
    finally:
        for thread in supervisor.restarts:
            thread.join(timeout=300)
        supervisor.stop()


def _restart_later(sup, stage: str, replica: int) -> None:
    thread = threading.Thread(target=sup.restart, args=(stage, replica), daemon=True)
    thread.start()
    sup.restarts.append(thread)


def _request(ids: list[int], max_tokens: int, **sampling) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        prompt_token_ids=gateway_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling),
    )


async def _loads(sup, stage: str) -> list[common_pb2.StageLoad]:
    stub_cls = {"prefill": prefill_pb2_grpc.PrefillStub, "decode": decode_pb2_grpc.DecodeStub}[stage]
    out = []
    for address in sup.config.addresses(stage):
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                out.append(await stub_cls(channel).GetLoad(common_pb2.LoadRequest(), timeout=2.0))
            except grpc.aio.AioRpcError:
                out.append(None)
    return out


async def _stream(sup, request, tokens: list[int], texts: list[str], trailer=None) -> common_pb2.TokenEvent:
    async with grpc.aio.insecure_channel(sup.config.replica_address("gateway", 0)) as channel:
        last = None
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=300)
        async for event in call:
            tokens += event.token_ids
            texts.append(event.text)
            last = event
        if trailer is not None:
            trailer.update(dict(await call.trailing_metadata() or ()))
        return last


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def assert_drained(sup, timeout: float = 20.0) -> None:
    """Every live prefill and decode replica reports no running/waiting requests, no pending tokens, no KV in
    use (a replica still restarting after a kill holds nothing)."""

    async def idle() -> bool:
        loads = [x for x in [*(await _loads(sup, "prefill")), *(await _loads(sup, "decode"))] if x is not None]
        return bool(loads) and all(
            (x.num_running, x.num_waiting, x.pending_tokens, x.kv_cache_usage) == (0, 0, 0, 0.0) for x in loads
        )

    asyncio.run(_until(idle, timeout, "every replica to report zero load"))


async def _kill_when(sup, stage: str, busy, executor_kill) -> int:
    """Waits until one replica of ``stage`` is busy (``busy(load)``), kills it; returns its index."""
    found: list[int] = []

    async def pick() -> bool:
        for i, load in enumerate(await _loads(sup, stage)):
            if load is not None and busy(load):
                found.append(i)
                return True
        return False

    await _until(pick, 120.0, f"a busy {stage} replica")
    await asyncio.to_thread(executor_kill, stage, found[0])
    return found[0]


def _run_with_kill(sup, request, stage: str, after_tokens: int, busy):
    tokens: list[int] = []
    texts: list[str] = []
    trailer: dict[str, str] = {}

    async def main():
        task = asyncio.create_task(_stream(sup, request, tokens, texts, trailer))
        await _until(lambda: _ready(len(tokens) >= after_tokens or task.done()), 120.0, f"{after_tokens} tokens")
        assert not task.done(), "the request finished before the fault could be injected"
        killed = await _kill_when(sup, stage, busy, sup.kill)
        last = await task
        return killed, last

    killed, last = asyncio.run(main())
    assert trailer.get("x-stageserve-migrations") == "1"  # the stream really moved to the other replica
    return tokens, "".join(texts), last, killed


async def _ready(value: bool) -> bool:
    return value


def _uninterrupted(sup, request):
    tokens: list[int] = []
    texts: list[str] = []
    last = asyncio.run(_stream(sup, request, tokens, texts))
    return tokens, "".join(texts), last


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 50, "seed": 1234}], ids=["greedy", "seeded"])
def test_decode_killed_mid_stream_is_migrated_token_exact(chaos, loaded, sampling):
    ids = loaded.tokenizer.encode("Write a long story about a lighthouse keeper who finds a map.")
    request = _request(ids, LONG, **sampling)
    want, want_text, _ = _uninterrupted(chaos, request)
    assert len(want) == LONG
    got, text, last, killed = _run_with_kill(chaos, request, "decode", 8, lambda x: x.num_running > 0)
    assert got == want  # no duplicated, no missing, no different token
    assert text == want_text
    assert last.finished and last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(ids), LONG)
    _restart_later(chaos, "decode", killed)
    assert_drained(chaos)


def _cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def _busiest_prefill(sup) -> int:
    """The prefill replica burning CPU now: the one running the long prompt's forward pass."""
    pids = [sup.process("prefill", i).pid for i in range(sup.config.prefill.replicas)]
    before = [_cpu_ticks(p) for p in pids]
    await asyncio.sleep(0.3)
    deltas = [_cpu_ticks(p) - b for p, b in zip(pids, before, strict=True)]
    return deltas.index(max(deltas))


def test_prefill_killed_mid_transfer_is_retried(chaos, loaded):
    text = " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 100)
    ids = loaded.tokenizer.encode(text)[:1500]
    request = _request(ids, 8)  # a prompt no prefill has cached yet: its forward pass takes a while
    tokens: list[int] = []

    async def main():
        task = asyncio.create_task(_stream(chaos, request, tokens, []))
        # decode has reserved KV and waits for pages: the prefill is running the prompt and pushing them
        await _until(_kv_reserved(chaos), 60.0, "decode to reserve KV")
        killed = await _busiest_prefill(chaos)
        assert not task.done()
        await asyncio.to_thread(chaos.kill, "prefill", killed)
        return killed, await task

    killed, last = asyncio.run(main())
    assert last.finished and len(tokens) == 8
    _restart_later(chaos, "prefill", killed)
    assert_drained(chaos)
    assert _uninterrupted(chaos, request)[0] == tokens


def _kv_reserved(sup):
    async def check() -> bool:
        return any(x is not None and x.kv_cache_usage > 0 and x.num_running == 0 for x in await _loads(sup, "decode"))

    return check


def test_throttler_down_fails_open(chaos, loaded):
    chaos.kill("throttler", 0)
    try:
        ids = loaded.tokenizer.encode("Hello there")
        tokens, _, last = _uninterrupted(chaos, _request(ids, 5))
        assert len(tokens) == 5 and last.finished
    finally:
        chaos.restart("throttler", 0)
    assert_drained(chaos)


def test_client_cancel_frees_everything(chaos, loaded):
    ids = loaded.tokenizer.encode("Tell me everything about the history of the printing press.")
    tokens: list[int] = []

    async def main():
        task = asyncio.create_task(_stream(chaos, _request(ids, 400), tokens, []))
        await _until(lambda: _ready(len(tokens) >= 3), 120.0, "first tokens")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert_drained(chaos)


def test_client_deadline_propagates_and_frees(chaos, loaded):
    ids = loaded.tokenizer.encode("Describe the ocean in great detail.")

    async def main():
        async with grpc.aio.insecure_channel(chaos.config.replica_address("gateway", 0)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in gateway_pb2_grpc.GatewayStub(channel).Generate(_request(ids, 1000), timeout=1.5):
                    pass
            return info.value.code()

    assert asyncio.run(main()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_drained(chaos)


def test_sigterm_drains_in_flight_then_stops(chaos, loaded):
    """SIGTERM to the decode serving a request: it reports NOT_SERVING, finishes the stream, then exits."""
    ids = loaded.tokenizer.encode("Count slowly from one to fifty.")
    request = _request(ids, 40)
    want, _, _ = _uninterrupted(chaos, request)
    tokens: list[int] = []

    def term(stage: str, replica: int) -> None:
        chaos.kill(stage, replica, signal.SIGTERM)

    async def main():
        task = asyncio.create_task(_stream(chaos, request, tokens, []))
        await _until(lambda: _ready(len(tokens) >= 2 or task.done()), 120.0, "first tokens")
        killed = await _kill_when(chaos, "decode", lambda x: x.num_running > 0, term)
        return killed, await task

    killed, last = asyncio.run(main())
    assert tokens == want and last.finished
    _restart_later(chaos, "decode", killed)
    assert_drained(chaos)
