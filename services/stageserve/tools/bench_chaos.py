"""``stageserve bench chaos``: a soak under process deaths (a benchmark, not a CI test).

Starts a local pipeline (2 prefill + 2 decode replicas), replays ``../shared/data/azure_llm_2023`` (the conv
trace: arrival gaps and prompt/output lengths, scaled to the small model; prompts are wikitext2 tokens) as
greedy requests through the gateway's gRPC API for ``--duration`` seconds, and meanwhile kills a random
prefill or decode process with SIGKILL every ``--kill-every`` seconds (never the last live replica of a stage)
and restarts it. Reports requests sent, completed, migrated (the gateway's ``x-stageserve-migrations``
trailer) and failed; re-runs every migrated request on the healed pipeline and compares its tokens
(greedy migrated streams must be identical); samples every stage process's RSS over time.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from stageserve.tools.bench_serve import parse_timestamp
from stageserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

DATA = Path("../shared/data")
TRACE = DATA / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
CORPUS = DATA / "wikitext2" / "test.txt"


@dataclass
class Outcome:
    index: int
    ids: list[int]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    migrations: int = 0
    error: str | None = None


def load_requests(n: int, rate: float, max_prompt: int, max_output: int, tokenizer: Any, seed: int) -> list[tuple]:
    """(arrival offset s, prompt ids, max_tokens) for ``n`` consecutive trace rows from a random start; gaps
    are rescaled so the mean rate is ``rate`` requests/s, lengths are clipped to the small model's budget."""
    with TRACE.open() as fh:
        rows = list(csv.DictReader(fh))
    rng = random.Random(seed)
    start = rng.randrange(0, len(rows) - n)
    rows = rows[start : start + n]
    stamps = [parse_timestamp(r["TIMESTAMP"]) for r in rows]
    span = max(stamps[-1] - stamps[0], 1e-6)
    scale = (n / rate) / span
    corpus = tokenizer.encode(CORPUS.read_text()[:400_000]) if CORPUS.exists() else list(range(100, 20000))
    out = []
    for r, stamp in zip(rows, stamps, strict=True):
        plen = max(8, min(max_prompt, int(r["ContextTokens"])))
        olen = max(4, min(max_output, int(r["GeneratedTokens"])))
        at = rng.randrange(0, len(corpus) - plen)
        out.append(((stamp - stamps[0]) * scale, corpus[at : at + plen], olen))
    return out


async def one_request(address: str, outcome: Outcome, timeout: float) -> None:
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=gateway_pb2.TokenIds(ids=outcome.ids),
        sampling=common_pb2.SamplingParams(max_tokens=outcome.max_tokens, ignore_eos=True),
    )
    async with grpc.aio.insecure_channel(address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=timeout)
        try:
            async for event in call:
                outcome.tokens += event.token_ids
            trailer = dict(await call.trailing_metadata() or ())
            outcome.migrations = int(trailer.get("x-stageserve-migrations", 0))
            if len(outcome.tokens) != outcome.max_tokens:
                outcome.error = f"{len(outcome.tokens)} tokens of {outcome.max_tokens}"
        except grpc.aio.AioRpcError as exc:
            outcome.error = f"{exc.code().name}: {exc.details()}"


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Chaos:
    """Kills and restarts prefill/decode replicas at random while the load runs; samples memory."""

    def __init__(self, sup: Any, every_s: float, seed: int) -> None:
        self.sup, self.every_s, self.rng = sup, every_s, random.Random(seed)
        self.kills: list[tuple[float, str]] = []
        self.memory: list[tuple[float, dict[str, float]]] = []
        self.restarting: dict[tuple[str, int], threading.Thread] = {}
        self.t0 = time.monotonic()

    def memory_sample(self) -> None:
        by_stage: dict[str, float] = {}
        for proc in self.sup.processes:
            if proc.popen.poll() is None:
                by_stage[proc.stage] = by_stage.get(proc.stage, 0.0) + _rss_mb(proc.pid)
        self.memory.append((time.monotonic() - self.t0, by_stage))

    def kill_one(self) -> None:
        stage = self.rng.choice(["prefill", "decode"])
        replicas = getattr(self.sup.config, stage).replicas
        busy = {key for key, thread in self.restarting.items() if thread.is_alive()}
        live = [i for i in range(replicas) if (stage, i) not in busy]
        if len(live) < 2:
            return  # never the last live replica of a stage
        victim = self.rng.choice(live)
        self.sup.kill(stage, victim)
        self.kills.append((time.monotonic() - self.t0, f"{stage}-{victim}"))
        thread = threading.Thread(target=self.sup.restart, args=(stage, victim), daemon=True)
        thread.start()
        self.restarting[(stage, victim)] = thread

    async def run(self, until: float) -> None:
        next_kill = time.monotonic() + self.every_s
        while time.monotonic() < until:
            self.memory_sample()
            if time.monotonic() >= next_kill:
                await asyncio.to_thread(self.kill_one)
                next_kill = time.monotonic() + self.every_s
            await asyncio.sleep(2.0)

    def join(self) -> None:
        for thread in self.restarting.values():
            thread.join(timeout=600)


async def soak(sup: Any, requests: list[tuple], duration: float, kill_every: float, seed: int) -> dict[str, Any]:
    address = sup.config.replica_address("gateway", 0)
    chaos = Chaos(sup, kill_every, seed)
    outcomes: list[Outcome] = []
    tasks = []
    start = time.monotonic()
    chaos_task = asyncio.create_task(chaos.run(start + duration))
    for i, (at, ids, max_tokens) in enumerate(requests):
        delay = start + at - time.monotonic()
        if at > duration:
            break
        if delay > 0:
            await asyncio.sleep(delay)
        outcome = Outcome(i, ids, max_tokens)
        outcomes.append(outcome)
        tasks.append(asyncio.create_task(one_request(address, outcome, timeout=600)))
    await chaos_task
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    await asyncio.to_thread(chaos.join)
    chaos.memory_sample()
    migrated = [o for o in outcomes if o.migrations and o.error is None]
    exact = 0
    for o in migrated:  # the healed pipeline, uninterrupted: greedy migrated streams must be identical
        again = Outcome(o.index, o.ids, o.max_tokens)
        await one_request(address, again, timeout=600)
        exact += again.tokens == o.tokens
    return {
        "duration_s": round(elapsed, 1),
        "sent": len(outcomes),
        "completed": sum(o.error is None for o in outcomes),
        "failed": sum(o.error is not None for o in outcomes),
        "errors": [o.error for o in outcomes if o.error][:10],
        "migrated_requests": len(migrated),
        "migrations": sum(o.migrations for o in outcomes),
        "migrated_token_exact": exact,
        "kills": chaos.kills,
        "memory_mb": [(round(t), {k: round(v) for k, v in m.items()}) for t, m in chaos.memory],
    }


def add_bench_chaos_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chaos", help="soak: replay the Azure trace while killing prefill/decode processes")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--rate", type=float, default=0.3, help="requests per second (trace gaps rescaled)")
    p.add_argument("--kill-every", type=float, default=30.0, help="seconds between kills")
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-output", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report here")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from stageserve.models.loader import load_tokenizer
    from stageserve.serving.supervisor import Supervisor, free_port_config

    n = int(args.duration * args.rate) + 5
    requests = load_requests(n, args.rate, args.max_prompt, args.max_output, load_tokenizer(None), args.seed)
    config = free_port_config(
        prefill={"replicas": 2, "kv_cache_memory_bytes": 128 << 20},
        decode={"replicas": 2, "kv_cache_memory_bytes": 256 << 20},
        gateway={"migration_wait_s": 120.0},
    )
    previous = signal.getsignal(signal.SIGINT)
    with Supervisor(config, startup_timeout_s=600.0, log_dir="/tmp/stageserve-chaos-logs") as sup:
        report = asyncio.run(soak(sup, requests, args.duration, args.kill_every, args.seed))
    signal.signal(signal.SIGINT, previous)
    mem = report["memory_mb"]
    print(f"sent {report['sent']}  completed {report['completed']}  failed {report['failed']}  "
          f"migrated requests {report['migrated_requests']} ({report['migrations']} migrations)  "
          f"token-exact {report['migrated_token_exact']}/{report['migrated_requests']}  in {report['duration_s']} s")
    print(f"kills: {', '.join(f'{t:.0f}s {name}' for t, name in report['kills'])}")
    if mem:
        total = [(t, sum(m.values())) for t, m in mem]
        print(f"RSS of all stages (MB): start {total[0][1]:.0f}, max {max(v for _, v in total):.0f}, "
              f"end {total[-1][1]:.0f}")
    for err in report["errors"]:
        print(f"  error: {err}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["failed"] == 0 else 1
