"""Online serving benchmark through the gateway, per KV format, side by side (``stageserve bench serve``).

Workload: requests sampled from the Azure LLM inference trace (2023) exactly as ``bench offline`` samples them
(:func:`stageserve.tools.bench_offline.sample_requests`, lengths scaled by ``--scale``, prompts cut from
WikiText-2 token ids), replayed open-loop at their trace arrival times compressed by ``--time-scale``. Every
request ignores EOS and generates its (scaled) trace output length.

Three reports in one run:

1. **Serving**, per KV format: the same requests are replayed once per format (one format after the other, on
   the same pipeline, the format chosen per request with the ``x-stageserve-kv-format`` metadata). TTFT, ITL
   and E2E are measured client-side on the gateway's gRPC token stream: TTFT = first event carrying tokens,
   ITL = gaps between later token events, E2E = the final event; p50/p90/p99, request throughput, output tok/s.
2. **KV bytes on the wire** per prompt token and format, computed with
   :meth:`stageserve.kvcodec.format.PageFormat.request_bytes` (``wire=True``) for the sampled prompts and for
   1K/2K/8K prompts, as a ratio to bf16; and *measured* on 3 prompts per format by calling a prefill replica's
   ``Prefill`` RPC directly (after opening the decode replica's ``Generate`` stream for the same request), whose
   ``kv_bytes`` must equal the computed value.
3. **Exposed transfer after prefill** for layer-wise KV streaming vs sending after the forward pass, under the
   same emulated prefill->decode link (``prefill.link_rate_gbps``): two pipelines differing only in
   ``prefill.stream_kv_layerwise``, direct ``Prefill`` calls on 3 prompts of ~1K tokens in bf16; plus JCT for
   each format side by side under that slow link.

Without ``--gateway`` the bench starts its own pipeline(s) with :class:`Supervisor` on free ports (prefix caching
off, so replaying the same prompts for the second format is not served from cache) and stops them at the end.
Everything is bounded: at most ``--num-requests`` requests per format and a global ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

DATA_DIR = Path("../shared/data")
DEFAULT_TRACE = str(DATA_DIR / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv")
DEFAULT_CORPUS = str(DATA_DIR / "wikitext2" / "test.txt")
CORPUS_TOKENS = 65536
REFERENCE_PROMPT_TOKENS = (1024, 2048, 8192)
MEASURED_PROMPTS = 3  # direct Prefill calls per format for the kv_bytes cross-check
LAYERWISE_PROMPTS = 3  # ~1K-token prompts per mode for the exposed-transfer comparison
DIRECT_MAX_TOKENS = 2  # tokens decode generates after a kv_bytes cross-check call
WARMUP_PROMPT_TOKENS = 16
PERCENTILES = (50, 90, 99)
MODES = ("layerwise", "after_prefill")
GRPC_CLIENT_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]

DEFAULTS: dict[str, Any] = {
    "data": DEFAULT_TRACE,
    "corpus": DEFAULT_CORPUS,
    "num_requests": 24,
    "time_scale": 0.05,
    "scale": 0.25,
    "max_output": 32,
    "max_context": 2048,
    "formats": "bf16,fp8",
    "link_gbps": 1.0,
    "gateway": None,
    "prefill": None,
    "decode": None,
    "model": None,
    "seed": 0,
    "layerwise_tokens": 1024,
    "skip_layerwise_compare": False,
    "timeout": 840.0,
    "log_dir": None,
    "json": None,
    "quiet": False,
}

T = TypeVar("T")


class BenchTimeout(TimeoutError):
    """The global ``--timeout`` ran out."""


# ---- statistics -----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """p50/p90/p99, mean, max and count of a list of seconds (None when empty)."""
    out: dict[str, Any] = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["mean"] = sum(values) / len(values) if values else None
    out["max"] = max(values) if values else None
    out["n"] = len(values)
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---- workload -------------------------------------------------------------------------------------
def parse_timestamp(text: str) -> float:
    """Seconds since the epoch of a trace timestamp like ``2023-11-16 18:17:03.9799600`` (7 fractional digits:
    cut to 26 characters, i.e. microseconds)."""
    return datetime.strptime(text.strip()[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def arrival_offsets(
    trace_csv: str, requests: Sequence[Any], num: int, scale: float, max_context: int, max_output: int, seed: int
) -> list[float]:
    """Trace arrival time of each request of ``sample_requests(..., num, ..., seed)``, in seconds after the
    earliest sampled arrival (not yet time-scaled).

    ``sample_requests`` draws its rows with ``random.Random(seed).sample(rows, num)``; ``random.sample`` picks by
    index from the population length and the generator state only, so sampling ``range(len(rows))`` with a
    fresh generator of the same seed yields the same rows. Each row's scaled lengths are checked against the
    request they should have produced, so a change in ``sample_requests`` fails loudly instead of silently
    pairing requests with the wrong arrival times.
    """
    with Path(trace_csv).open() as fh:
        rows = [(r["TIMESTAMP"], int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(fh)]
    indices = random.Random(seed).sample(range(len(rows)), num)
    if len(indices) != len(requests):
        raise RuntimeError(f"{len(requests)} sampled requests but {len(indices)} trace rows")
    stamps = []
    for idx, req in zip(indices, requests, strict=True):
        stamp, ctx, gen = rows[idx]
        output_len = max(1, min(max_output, round(gen * scale)))
        prompt_len = max(1, min(max_context - output_len, round(ctx * scale)))
        if (output_len, prompt_len) != (req.output_len, len(req.prompt_ids)):
            raise RuntimeError(f"trace row {idx} does not match its sampled request; cannot recover arrival times")
        stamps.append(parse_timestamp(stamp))
    first = min(stamps)
    return [s - first for s in stamps]


def corpus_prompts(corpus: Sequence[int], length: int, count: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``length`` corpus tokens at distinct random offsets."""
    length = max(1, min(length, len(corpus) - 1))
    rng = random.Random(seed)
    starts = rng.sample(range(0, len(corpus) - length), count)
    return [list(corpus[s : s + length]) for s in starts]


# ---- KV bytes (computed) --------------------------------------------------------------------------
def computed_kv_bytes(
    formats: Sequence[str], prompt_lengths: Sequence[int], num_layers: int, num_kv_heads: int, head_dim: int
) -> dict[str, Any]:
    """Wire bytes per prompt token per format (PageFormat.request_bytes, wire=True) and the ratio to bf16, for
    the sampled prompt lengths (total bytes / total tokens, and the mean of per-prompt values) and for 1K/2K/8K."""
    from stageserve.kvcodec.format import PageFormat

    def wire_bytes(fmt: str, n: int) -> int:
        return PageFormat(fmt, num_kv_heads, head_dim).request_bytes(n, num_layers, wire=True)

    names = list(dict.fromkeys(["bf16", *formats]))
    out: dict[str, Any] = {}
    for fmt in names:
        entry: dict[str, Any] = {}
        per_prompt = [wire_bytes(fmt, n) for n in prompt_lengths]
        ref = [wire_bytes("bf16", n) for n in prompt_lengths]
        total_tokens = sum(prompt_lengths)
        entry["sampled"] = {
            "prompts": len(prompt_lengths),
            "bytes": sum(per_prompt),
            "bytes_per_token": sum(per_prompt) / total_tokens if total_tokens else None,
            "mean_bytes_per_token": _mean([b / n for b, n in zip(per_prompt, prompt_lengths, strict=True)]),
            "ratio_to_bf16": sum(per_prompt) / sum(ref) if sum(ref) else None,
        }
        for n in REFERENCE_PROMPT_TOKENS:
            b = wire_bytes(fmt, n)
            entry[str(n)] = {"bytes": b, "bytes_per_token": b / n, "ratio_to_bf16": b / wire_bytes("bf16", n)}
        out[fmt] = entry
    return out


# ---- gRPC clients ---------------------------------------------------------------------------------
@dataclass
class RequestResult:
    index: int
    prompt_tokens: int
    expected_output_tokens: int
    arrival_s: float  # scheduled, after the replay start
    sent_s: float | None = None  # actual, after the replay start
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = ""
    finished: bool = False
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.error is None and self.finished and self.output_tokens == self.expected_output_tokens


def _channel(address: str) -> Any:
    import grpc

    return grpc.aio.insecure_channel(address, options=GRPC_CLIENT_OPTIONS)


async def _gateway_request(
    stub: Any, ids: Sequence[int], max_tokens: int, kv_format: str, result: RequestResult, start: float, timeout: float
) -> RequestResult:
    """Sends one request at ``start + result.arrival_s`` and times its token stream."""
    import grpc

    from stageserve.v1 import common_pb2, gateway_pb2

    await asyncio.sleep(max(0.0, start + result.arrival_s - time.perf_counter()))
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=gateway_pb2.TokenIds(ids=list(ids)),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        request_id=f"bench-{kv_format}-{result.index}-{uuid.uuid4().hex[:8]}",
    )
    sent = time.perf_counter()
    result.sent_s = sent - start
    last: float | None = None
    try:
        call = stub.Generate(request, metadata=(("x-stageserve-kv-format", kv_format),), timeout=timeout)
        async for event in call:
            now = time.perf_counter()
            if event.token_ids:
                if last is None:
                    result.ttft_s = now - sent
                else:
                    result.itl_s.append(now - last)
                last = now
                result.output_tokens += len(event.token_ids)
            if event.finished:
                result.finished = True
                result.e2e_s = now - sent
                result.finish_reason = event.finish_reason
                result.cached_tokens = event.usage.cached_tokens
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    if result.finished is False and result.error is None:
        result.error = "stream ended without a finished event"
    return result


async def replay_format(
    gateway: str,
    requests: Sequence[Any],
    offsets: Sequence[float],
    kv_format: str,
    warmup_ids: Sequence[int],
    timeout: float,
) -> dict[str, Any]:
    """Replays every request (open loop, at its offset) with one KV format; returns the format's metrics."""
    from stageserve.v1 import gateway_pb2_grpc

    async with _channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        warm = RequestResult(-1, len(warmup_ids), 2, 0.0)
        await _gateway_request(stub, warmup_ids, 2, kv_format, warm, time.perf_counter(), timeout)
        if warm.error:
            raise RuntimeError(f"warm-up request ({kv_format}) failed: {warm.error}")
        start = time.perf_counter()
        tasks = [
            _gateway_request(
                stub,
                req.prompt_ids,
                req.output_len,
                kv_format,
                RequestResult(i, len(req.prompt_ids), req.output_len, off),
                start,
                timeout,
            )
            for i, (req, off) in enumerate(zip(requests, offsets, strict=True))
        ]
        results = await asyncio.gather(*tasks)
    return serve_metrics(results)


def serve_metrics(results: Sequence[RequestResult]) -> dict[str, Any]:
    done = [r for r in results if r.completed]
    ends = [r.sent_s + r.e2e_s for r in done if r.sent_s is not None and r.e2e_s is not None]
    duration = max(ends) if ends else None  # from the replay start (first arrival) to the last completion
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error}),
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "output_tokens": output_tokens,
        "expected_output_tokens": sum(r.expected_output_tokens for r in results),
        "cached_tokens": sum(r.cached_tokens for r in results),
        "duration_s": duration,
        "request_throughput_rps": len(done) / duration if duration else None,
        "output_tok_s": output_tokens / duration if duration else None,
        "ttft_s": summarize([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl_s": summarize([gap for r in done for gap in r.itl_s]),
        "e2e_s": summarize([r.e2e_s for r in done if r.e2e_s is not None]),
        "per_request": [
            {k: v for k, v in asdict(r).items() if k != "itl_s"} | {"itl_mean_s": _mean(r.itl_s)} for r in results
        ],
    }


async def direct_prefill(
    prefill: str, decode: str, ids: Sequence[int], kv_format: str, max_tokens: int, timeout: float
) -> dict[str, Any]:
    """One request through prefill -> decode without the gateway: opens decode's ``Generate`` stream first (so
    decode reserves KV and accepts the pages), calls prefill's ``Prefill``, then reads decode's stream to the end.
    Returns PrefillResponse's statistics plus the JCT (decode stream opened -> its last event)."""
    from stageserve.serving.common.convert import FORMAT_IDS, FORMAT_NAMES
    from stageserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

    rid = f"bench-direct-{kv_format}-{uuid.uuid4().hex[:12]}"
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    async with _channel(decode) as dch, _channel(prefill) as pch:
        started = time.perf_counter()
        call = decode_pb2_grpc.DecodeStub(dch).Generate(
            decode_pb2.DecodeRequest(
                request_id=rid, prompt_token_ids=list(ids), sampling=sampling, kv_format=FORMAT_IDS[kv_format]
            ),
            timeout=timeout,
        )

        async def read() -> tuple[int, float | None, bool]:
            tokens, first, finished = 0, None, False
            async for event in call:
                if event.token_ids and first is None:
                    first = time.perf_counter()
                tokens += len(event.token_ids)
                finished = finished or event.finished
            return tokens, first, finished

        reader = asyncio.ensure_future(read())
        try:
            response = await prefill_pb2_grpc.PrefillStub(pch).Prefill(
                prefill_pb2.PrefillRequest(
                    request_id=rid,
                    prompt_token_ids=list(ids),
                    sampling=sampling,
                    decode_address=decode,
                    kv_format=FORMAT_IDS[kv_format],
                ),
                timeout=timeout,
            )
            tokens, first, finished = await reader
        except BaseException:
            reader.cancel()
            call.cancel()
            raise
        ended = time.perf_counter()
    return {
        "request_id": rid,
        "format": kv_format,
        "returned_format": FORMAT_NAMES.get(response.kv_format, str(response.kv_format)),
        "prompt_tokens": len(ids),
        "kv_bytes": int(response.kv_bytes),
        "kv_frames": int(response.kv_frames),
        "num_cached_tokens": int(response.num_cached_tokens),
        "prefill_s": response.prefill_seconds,
        "exposed_transfer_s": response.exposed_transfer_seconds,
        "ttft_s": (first - started) if first is not None else None,
        "jct_s": ended - started,
        "output_tokens": tokens,
        "finished": finished,
    }


async def measure_kv_bytes(
    prefill: str,
    decode: str,
    prompts: Sequence[Sequence[int]],
    formats: Sequence[str],
    shape: tuple[int, int, int],
    timeout: float,
) -> list[dict[str, Any]]:
    """Direct Prefill calls (one at a time) whose kv_bytes are compared with PageFormat.request_bytes."""
    from stageserve.kvcodec import wire
    from stageserve.kvcodec.format import PageFormat

    num_layers, heads, head_dim = shape
    rows = []
    for fmt in formats:
        page = PageFormat(fmt, heads, head_dim)
        for ids in prompts:
            row = await direct_prefill(prefill, decode, ids, fmt, DIRECT_MAX_TOKENS, timeout)
            row["computed_bytes"] = page.request_bytes(len(ids), num_layers, wire=True)
            row["expected_frames"] = len(wire.spans(page, len(ids))) * num_layers
            row["equal"] = row["kv_bytes"] == row["computed_bytes"]
            rows.append(row)
    return rows


async def measure_mode(
    prefill: str,
    decode: str,
    prompts: Sequence[Sequence[int]],
    warmup: Sequence[int],
    formats: Sequence[str],
    max_tokens: int,
    timeout: float,
) -> dict[str, list[dict[str, Any]]]:
    """Direct Prefill calls on the ~1K prompts per format, after one warm-up call of the same size."""
    await direct_prefill(prefill, decode, warmup, formats[0], 1, timeout)
    out: dict[str, list[dict[str, Any]]] = {}
    for fmt in formats:
        out[fmt] = [await direct_prefill(prefill, decode, ids, fmt, max_tokens, timeout) for ids in prompts]
    return out


def summarize_layerwise(calls_by_mode: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Means per streaming mode (layerwise | after_prefill) of prefill, exposed transfer and JCT seconds; when
    both modes are present, how much exposed transfer layer-wise streaming hides."""
    out: dict[str, Any] = {}
    for mode, calls in calls_by_mode.items():
        out[mode] = {
            "calls": len(calls),
            "prompt_tokens_mean": _mean([c["prompt_tokens"] for c in calls]),
            "kv_bytes_mean": _mean([c["kv_bytes"] for c in calls]),
            "prefill_s_mean": _mean([c["prefill_s"] for c in calls]),
            "exposed_transfer_s_mean": _mean([c["exposed_transfer_s"] for c in calls]),
            "ttft_s_mean": _mean([c["ttft_s"] for c in calls if c.get("ttft_s") is not None]),
            "jct_s_mean": _mean([c["jct_s"] for c in calls]),
        }
    a, b = out.get("layerwise"), out.get("after_prefill")
    if a and b and a["exposed_transfer_s_mean"] is not None and b["exposed_transfer_s_mean"] is not None:
        out["exposed_saved_s"] = b["exposed_transfer_s_mean"] - a["exposed_transfer_s_mean"]
        out["exposed_ratio"] = (
            a["exposed_transfer_s_mean"] / b["exposed_transfer_s_mean"] if b["exposed_transfer_s_mean"] > 0 else None
        )
    return out


# ---- orchestration --------------------------------------------------------------------------------
class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise BenchTimeout(f"bench serve: global timeout of {self.seconds:g}s reached")
        return left

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            left = self.left()
        except BenchTimeout:
            coro.close()
            raise
        try:
            return asyncio.run(asyncio.wait_for(coro, left))
        except TimeoutError as exc:
            if isinstance(exc, BenchTimeout):
                raise
            raise BenchTimeout(f"bench serve: global timeout of {self.seconds:g}s reached") from exc


def _options(args: argparse.Namespace | dict[str, Any] | None) -> argparse.Namespace:
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return argparse.Namespace(**{**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}})


def _log(opts: argparse.Namespace, message: str) -> None:
    if not opts.quiet:
        print(f"[bench serve] {message}", file=sys.stderr, flush=True)


def _start_pipeline(opts: argparse.Namespace, layerwise: bool, deadline: _Deadline, log_dir: Path) -> tuple[Any, Any]:
    from stageserve.serving.supervisor import Supervisor, free_port_config

    engine = {"enable_prefix_caching": False}
    overrides: dict[str, Any] = {
        "prefill": {**engine, "link_rate_gbps": float(opts.link_gbps), "stream_kv_layerwise": layerwise},
        "decode": dict(engine),
    }
    if opts.model:
        overrides["model"] = opts.model
    config = free_port_config(**overrides)
    logs = log_dir / ("layerwise" if layerwise else "after-prefill")
    out: Any = _NullWriter() if opts.quiet else sys.stderr
    supervisor = Supervisor(config, log_dir=logs, startup_timeout_s=min(300.0, deadline.left()), out=out)
    _log(opts, f"starting a pipeline (stream_kv_layerwise={layerwise}, link {opts.link_gbps} Gbit/s; logs {logs})")
    t0 = time.monotonic()
    endpoints = supervisor.start()
    _log(opts, f"pipeline up in {time.monotonic() - t0:.1f}s")
    return supervisor, endpoints


class _NullWriter:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def run_bench_serve(args: argparse.Namespace | dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs ``stageserve bench serve``; prints the report table and returns every number as a dict (also written
    to ``--json`` when given). Raises BenchTimeout when ``--timeout`` runs out (pipelines are stopped first)."""
    from stageserve.models.loader import load_tokenizer, read_model_config
    from stageserve.tools.bench_offline import sample_requests
    from stageserve.tools.eval_ppl import corpus_tokens

    opts = _options(args)
    wall0 = time.monotonic()
    deadline = _Deadline(float(opts.timeout))
    formats = [f.strip() for f in str(opts.formats).split(",") if f.strip()]
    if not formats:
        raise ValueError("--formats: give at least one KV format")
    if opts.num_requests < 1 or opts.max_output < 1:
        raise ValueError("--num-requests and --max-output must be >= 1")

    mc = read_model_config(opts.model)
    tokenizer = load_tokenizer(opts.model)
    shape = (mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim)
    corpus = corpus_tokens(tokenizer, opts.corpus, CORPUS_TOKENS)
    max_context = min(int(opts.max_context), mc.max_position_embeddings)
    sample_args = (opts.num_requests, opts.scale, max_context, opts.max_output, opts.seed)
    requests = sample_requests(opts.data, corpus, *sample_args)
    offsets = [o * opts.time_scale for o in arrival_offsets(opts.data, requests, *sample_args)]
    prompt_lengths = [len(r.prompt_ids) for r in requests]
    by_length = sorted(range(len(requests)), key=lambda i: prompt_lengths[i])
    picks = sorted({by_length[0], by_length[len(by_length) // 2], by_length[-1]}, key=lambda i: prompt_lengths[i])
    for i in by_length:  # top up to MEASURED_PROMPTS distinct requests when fewer lengths were picked
        if len(picks) >= min(MEASURED_PROMPTS, len(requests)):
            break
        if i not in picks:
            picks.append(i)
    measured_prompts = [requests[i].prompt_ids for i in picks]
    big = corpus_prompts(
        corpus, min(int(opts.layerwise_tokens), max_context - opts.max_output), LAYERWISE_PROMPTS + 1, opts.seed + 1
    )
    warmup_big, layerwise_prompts = big[0], big[1:]

    result: dict[str, Any] = {
        "config": {
            "model": mc.name,
            "num_layers": shape[0],
            "num_kv_heads": shape[1],
            "head_dim": shape[2],
            "formats": formats,
            "num_requests": opts.num_requests,
            "time_scale": opts.time_scale,
            "scale": opts.scale,
            "max_output": opts.max_output,
            "max_context": max_context,
            "link_gbps": opts.link_gbps,
            "seed": opts.seed,
            "gateway": opts.gateway,
            "own_pipeline": opts.gateway is None,
            "prefix_caching": "off (own pipeline)" if opts.gateway is None else "as configured (external gateway)",
            "timeout_s": opts.timeout,
        },
        "workload": {
            "requests": len(requests),
            "prompt_tokens": prompt_lengths,
            "output_tokens": [r.output_len for r in requests],
            "arrival_s": offsets,
            "arrival_span_s": max(offsets) if offsets else 0.0,
        },
        "serve": {},
        "kv_bytes": {"computed": computed_kv_bytes(formats, prompt_lengths, *shape), "measured": []},
        "layerwise": {"skipped": None},
    }
    log_dir = Path(opts.log_dir) if opts.log_dir else Path(tempfile.mkdtemp(prefix="stageserve-bench-serve-"))
    supervisors: list[Any] = []
    try:
        prefill = decode = None
        if opts.gateway is None:
            supervisor, endpoints = _start_pipeline(opts, True, deadline, log_dir)
            supervisors.append(supervisor)
            gateway = endpoints.gateway_grpc
            prefill, decode = endpoints.stages["prefill"][0], endpoints.stages["decode"][0]
        else:
            gateway, prefill, decode = opts.gateway, opts.prefill, opts.decode

        # 1. serving, one format after the other
        warmup_ids = corpus[:WARMUP_PROMPT_TOKENS]
        for fmt in formats:
            _log(opts, f"replaying {len(requests)} requests with kv format {fmt} over ~{max(offsets):.0f}s")
            rpc_timeout = min(600.0, deadline.left())
            result["serve"][fmt] = deadline.run(replay_format(gateway, requests, offsets, fmt, warmup_ids, rpc_timeout))
            s = result["serve"][fmt]
            _log(opts, f"{fmt}: {s['completed']}/{s['requests']} completed in {s['duration_s'] or 0:.1f}s")

        # 2. measured kv_bytes (direct Prefill calls)
        if prefill and decode:
            _log(opts, f"direct Prefill calls: {len(measured_prompts)} prompts x {len(formats)} formats")
            result["kv_bytes"]["measured"] = deadline.run(
                measure_kv_bytes(prefill, decode, measured_prompts, formats, shape, min(300.0, deadline.left()))
            )
        else:
            result["kv_bytes"]["measured_skipped"] = "external gateway without --prefill/--decode addresses"

        # 3. exposed transfer: layer-wise vs after prefill (own pipelines only)
        calls: dict[str, dict[str, list[dict[str, Any]]]] = {}
        jct_formats = list(dict.fromkeys(["bf16", *formats]))
        if opts.gateway is None:
            _log(opts, f"layer-wise mode: {len(layerwise_prompts)} prompts of {len(layerwise_prompts[0])} tokens")
            calls["layerwise"] = deadline.run(
                measure_mode(
                    prefill,
                    decode,
                    layerwise_prompts,
                    warmup_big,
                    jct_formats,
                    opts.max_output,
                    min(300.0, deadline.left()),
                )
            )
        if not opts.skip_layerwise_compare:
            for supervisor in supervisors:
                supervisor.stop()  # free the CPU for the next pipeline
            if "layerwise" not in calls:
                supervisor, endpoints = _start_pipeline(opts, True, deadline, log_dir)
                supervisors.append(supervisor)
                p, d = endpoints.stages["prefill"][0], endpoints.stages["decode"][0]
                calls["layerwise"] = deadline.run(
                    measure_mode(
                        p, d, layerwise_prompts, warmup_big, jct_formats, opts.max_output, min(300.0, deadline.left())
                    )
                )
                supervisor.stop()
            supervisor, endpoints = _start_pipeline(opts, False, deadline, log_dir)
            supervisors.append(supervisor)
            p, d = endpoints.stages["prefill"][0], endpoints.stages["decode"][0]
            _log(opts, f"send-after-prefill mode: {len(layerwise_prompts)} prompts")
            calls["after_prefill"] = deadline.run(
                measure_mode(
                    p, d, layerwise_prompts, warmup_big, ["bf16"], opts.max_output, min(300.0, deadline.left())
                )
            )
            supervisor.stop()
        else:
            result["layerwise"]["skipped"] = "--skip-layerwise-compare: send-after-prefill pipeline not started"
        if calls:
            result["layerwise"].update(
                {
                    "format": "bf16",
                    "link_gbps": opts.link_gbps,
                    "prompts": len(layerwise_prompts),
                    "prompt_tokens": len(layerwise_prompts[0]),
                    "max_tokens": opts.max_output,
                    "modes": summarize_layerwise({m: c["bf16"] for m, c in calls.items()}),
                    "jct_by_format": {
                        fmt: summarize_layerwise({"layerwise": c})["layerwise"]
                        for fmt, c in calls.get("layerwise", {}).items()
                    },
                    "calls": calls,
                }
            )
        elif result["layerwise"]["skipped"] is None:
            result["layerwise"]["skipped"] = "no pipeline to measure"
        result["jct_slow_link"] = {
            fmt: {"e2e_mean_s": s["e2e_s"]["mean"], "e2e_p50_s": s["e2e_s"]["p50"], "e2e_p90_s": s["e2e_s"]["p90"]}
            for fmt, s in result["serve"].items()
        }
    finally:
        for supervisor in supervisors:
            supervisor.stop()
    result["wall_s"] = time.monotonic() - wall0
    print(format_report(result), flush=True)
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2))
    return result


# ---- report ---------------------------------------------------------------------------------------
def _f(value: Any, spec: str = ".3f", width: int = 8) -> str:
    if value is None:
        return "-".rjust(width)
    return format(value, spec).rjust(width)


def format_report(result: dict[str, Any]) -> str:
    cfg, wl = result["config"], result["workload"]
    lines: list[str] = []
    prompts, outputs = wl["prompt_tokens"], wl["output_tokens"]
    lines.append(
        f"stageserve bench serve: {cfg['model']} ({cfg['num_layers']} layers, {cfg['num_kv_heads']} KV heads x "
        f"{cfg['head_dim']}), link {cfg['link_gbps']} Gbit/s, prefix caching {cfg['prefix_caching']}"
    )
    if prompts:
        lines.append(
            f"workload: {wl['requests']} Azure conv requests (scale {cfg['scale']}), prompt tokens mean "
            f"{sum(prompts) / len(prompts):.0f} (min {min(prompts)}, max {max(prompts)}), output tokens mean "
            f"{sum(outputs) / len(outputs):.1f} (max {max(outputs)}), arrivals over {wl['arrival_span_s']:.1f}s "
            f"(time scale {cfg['time_scale']})"
        )
    lines.append("")
    lines.append("1) Serving through the gateway, client-side seconds (same requests per format, ignore_eos)")
    head = "{:<6}{:>7} | {:>24} | {:>24} | {:>24} | {:>7}{:>10}"
    lines.append(
        head.format(
            "format", "done", "TTFT p50 / p90 / p99", "ITL p50 / p90 / p99", "E2E p50 / p90 / p99", "req/s", "out tok/s"
        )
    )
    for fmt, s in result["serve"].items():

        def trio(d: dict[str, Any]) -> str:
            return " ".join(_f(d[f"p{q}"], ".3f", 7) for q in PERCENTILES)

        lines.append(
            head.format(
                fmt,
                f"{s['completed']}/{s['requests']}",
                trio(s["ttft_s"]),
                trio(s["itl_s"]),
                trio(s["e2e_s"]),
                _f(s["request_throughput_rps"], ".3f", 7),
                _f(s["output_tok_s"], ".1f", 10),
            )
        )
        if s["errors"]:
            lines.append(f"       errors: {'; '.join(s['errors'])}")
    lines.append("")
    lines.append("2) KV bytes on the wire per prompt token (PageFormat.request_bytes, wire=True; ratio to bf16)")
    computed = result["kv_bytes"]["computed"]
    cols = ["sampled", *[str(n) for n in REFERENCE_PROMPT_TOKENS]]
    labels = {"sampled": "sampled prompts", "1024": "1K prompt", "2048": "2K prompt", "8192": "8K prompt"}
    lines.append("{:<6}".format("format") + "".join(f" | {labels.get(c, c):>18}" for c in cols))
    for fmt, entry in computed.items():
        cells = [f"{entry[c]['bytes_per_token']:>9.1f} B {entry[c]['ratio_to_bf16']:>6.3f}" for c in cols]
        lines.append(f"{fmt:<6}" + "".join(f" | {c:>18}" for c in cells))
    measured = result["kv_bytes"]["measured"]
    if measured:
        lines.append("   measured with direct Prefill calls (PrefillResponse.kv_bytes vs computed):")
        lines.append(
            "   {:<6}{:>8}{:>12}{:>12}{:>7}{:>8}".format("format", "tokens", "kv_bytes", "computed", "equal", "frames")
        )
        for row in measured:
            lines.append(
                "   {:<6}{:>8}{:>12}{:>12}{:>7}{:>8}".format(
                    row["format"],
                    row["prompt_tokens"],
                    row["kv_bytes"],
                    row["computed_bytes"],
                    "yes" if row["equal"] else "NO",
                    row["kv_frames"],
                )
            )
    elif result["kv_bytes"].get("measured_skipped"):
        lines.append(f"   measured: skipped ({result['kv_bytes']['measured_skipped']})")
    lines.append("")
    lw = result["layerwise"]
    if "modes" in lw:
        lines.append(
            f"3) Exposed KV transfer after prefill: {lw['format']}, {lw['prompts']} prompts of {lw['prompt_tokens']} "
            f"tokens, {lw['max_tokens']} output tokens, emulated link {lw['link_gbps']} Gbit/s (direct Prefill calls)"
        )
        row = "{:<15}{:>11}{:>13}{:>10}{:>10}{:>10}"
        lines.append(row.format("mode", "prefill s", "exposed s", "TTFT s", "JCT s", "KV MB"))
        for mode in MODES:
            m = lw["modes"].get(mode)
            if not m:
                lines.append(row.format(mode, "-", "-", "-", "-", "-") + "  (not run)")
                continue
            lines.append(
                row.format(
                    mode,
                    _f(m["prefill_s_mean"], ".3f", 11),
                    _f(m["exposed_transfer_s_mean"], ".4f", 13),
                    _f(m["ttft_s_mean"], ".3f", 10),
                    _f(m["jct_s_mean"], ".3f", 10),
                    _f(m["kv_bytes_mean"] / 1e6 if m["kv_bytes_mean"] is not None else None, ".2f", 10),
                )
            )
        if "exposed_saved_s" in lw["modes"]:
            lines.append(f"   layer-wise streaming hides {lw['modes']['exposed_saved_s']:.4f}s of exposed transfer")
        if lw.get("skipped"):
            lines.append(f"   ({lw['skipped']})")
        lines.append("   JCT under the slow link, per format:")
        row = "   {:<6}{:>16}{:>16}{:>24}{:>24}"
        n = lw["prompt_tokens"]
        lines.append(
            row.format("format", "serve E2E mean", "serve E2E p50", f"JCT ({n}-tok, direct)", f"exposed s ({n}-tok)")
        )
        for fmt in dict.fromkeys([*result.get("jct_slow_link", {}), *lw.get("jct_by_format", {})]):
            serve = result.get("jct_slow_link", {}).get(fmt, {})
            direct = lw.get("jct_by_format", {}).get(fmt, {})
            lines.append(
                row.format(
                    fmt,
                    _f(serve.get("e2e_mean_s"), ".3f", 16),
                    _f(serve.get("e2e_p50_s"), ".3f", 16),
                    _f(direct.get("jct_s_mean"), ".3f", 24),
                    _f(direct.get("exposed_transfer_s_mean"), ".4f", 24),
                )
            )
    else:
        lines.append(f"3) Exposed KV transfer: skipped ({lw.get('skipped')})")
    lines.append("")
    lines.append(f"wall time {result.get('wall_s', 0.0):.1f}s")
    return "\n".join(lines)


# ---- CLI ------------------------------------------------------------------------------------------
def add_bench_serve_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``stageserve bench serve`` on the ``bench`` subparsers; ``args.func(args)`` returns 0."""
    p = bench_subparsers.add_parser(
        "serve", help="online serving through the gateway per KV format: TTFT/ITL/E2E, KV bytes, exposed transfer"
    )
    p.add_argument("--data", default=DEFAULTS["data"], help="Azure LLM trace CSV (TIMESTAMP,ContextTokens,...)")
    p.add_argument("--corpus", default=DEFAULTS["corpus"], help="WikiText-2 test.txt (prompt token ids)")
    p.add_argument("--num-requests", type=int, default=DEFAULTS["num_requests"], help="requests per KV format")
    p.add_argument(
        "--time-scale", type=float, default=DEFAULTS["time_scale"], help="multiplies trace inter-arrival times"
    )
    p.add_argument("--scale", type=float, default=DEFAULTS["scale"], help="multiplies trace prompt/output lengths")
    p.add_argument("--max-output", type=int, default=DEFAULTS["max_output"], help="cap on output tokens")
    p.add_argument("--max-context", type=int, default=DEFAULTS["max_context"], help="cap on prompt + output tokens")
    p.add_argument("--formats", default=DEFAULTS["formats"], help="comma-separated KV formats (bf16,fp8)")
    p.add_argument(
        "--link-gbps", type=float, default=DEFAULTS["link_gbps"], help="emulated prefill->decode link (0 = no limit)"
    )
    p.add_argument("--gateway", default=None, help="gRPC address of a running gateway (default: start a pipeline)")
    p.add_argument("--prefill", default=None, help="with --gateway: a prefill replica's address (direct calls)")
    p.add_argument("--decode", default=None, help="with --gateway: a decode replica's address (direct calls)")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument(
        "--layerwise-tokens", type=int, default=DEFAULTS["layerwise_tokens"], help="prompt tokens for part 3"
    )
    p.add_argument(
        "--skip-layerwise-compare",
        action="store_true",
        help="do not start the second (send-after-prefill) pipeline; measure the layer-wise mode only",
    )
    p.add_argument("--timeout", type=float, default=DEFAULTS["timeout"], help="global timeout in seconds")
    p.add_argument("--log-dir", default=None, help="where the pipeline's stage logs go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_bench_serve_main)
    return p


def _bench_serve_main(args: argparse.Namespace) -> int:
    run_bench_serve(args)
    return 0
