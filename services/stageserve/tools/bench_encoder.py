"""``stageserve bench encoder``: image+text requests sampled from the ServeGen multimodal trace, replayed
through real pipelines: 1 vs 2 encoder replicas, least-pending-image-token routing vs round-robin.

Trace (``../shared/data/servegen_mm_image``): ``chunk-N-dataset.json`` holds, per time window, distributions
(value -> probability) of text tokens, image tokens per request, images per request and output tokens;
``chunk-N-trace.csv`` holds per window ``start_s, rate_rps, cv, Gamma, shape, scale`` of the inter-arrivals.
Scaled to a CPU: text tokens x ``--text-scale``, images per request capped at ``--max-images``, each image's
share of the request's image tokens mapped to 1, 3 or 5 tiles (a small, a 2x1 and a 2x2 image), arrivals at
``--rate`` requests/s with the window's Gamma shape (burstiness kept). Same requests, same arrival times in
every configuration. TTFT is measured at the client (first token event of the gRPC stream).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import io
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path("../shared/data/servegen_mm_image")
WORDS = "the a cat dog sky red blue house tree river city picture shows what is in this image of".split()


@dataclass(frozen=True)
class MMRequest:
    arrival_s: float
    text_words: int
    image_sizes: tuple[tuple[int, int], ...]
    max_tokens: int


def _dist(raw: Any) -> tuple[list[int], list[float]]:
    table = ast.literal_eval(raw) if isinstance(raw, str) else raw
    values = sorted(int(k) for k in table)
    return values, [float(table[v] if v in table else table[str(v)]) for v in values]


def sample_requests(data: Path, chunk: int, n: int, rate: float, args: argparse.Namespace) -> list[MMRequest]:
    """``n`` requests from the first window of chunk ``chunk``, arrivals Gamma(shape) scaled to ``rate``."""
    dataset = json.loads((data / f"chunk-{chunk}-dataset.json").read_text())
    window = dataset[sorted(dataset, key=int)[0]]
    shape = float((data / f"chunk-{chunk}-trace.csv").read_text().splitlines()[0].split(",")[4])
    rng = random.Random(args.seed)
    dists = {k: _dist(window[k]) for k in ("text_tokens", "image_tokens", "image_count", "output_tokens")}

    def draw(key: str) -> int:
        values, weights = dists[key]
        return rng.choices(values, weights)[0]

    t = 0.0
    out = []
    for _ in range(n):
        count = max(1, min(draw("image_count"), args.max_images))
        per_image = draw("image_tokens") / count
        tiles = 1 if per_image < 256 else 3 if per_image < 640 else 5
        size = {1: (28, 28), 3: (60, 30), 5: (60, 60)}[tiles]
        words = max(4, int(draw("text_tokens") * args.text_scale))
        out.append(MMRequest(t, words, (size,) * count, max(1, min(draw("output_tokens"), args.max_output))))
        t += rng.gammavariate(shape, 1.0 / (shape * rate))
    return out


def _png(size: tuple[int, int], seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


async def _one(stub: Any, req: MMRequest, index: int, start: float) -> dict[str, float]:
    from stageserve.v1 import common_pb2, gateway_pb2

    await asyncio.sleep(max(0.0, start + req.arrival_s - time.monotonic()))
    rng = random.Random(index)
    text = " ".join(rng.choice(WORDS) for _ in range(req.text_words))
    images = [gateway_pb2.ImageInput(data=_png(s, index * 100 + j)) for j, s in enumerate(req.image_sizes)]
    msg = gateway_pb2.ChatMessage(role="user", content=text, images=images)
    request = gateway_pb2.GenerateRequest(
        chat=gateway_pb2.ChatMessages(messages=[msg]),
        sampling=common_pb2.SamplingParams(max_tokens=req.max_tokens, ignore_eos=True),
    )
    sent = time.monotonic()
    first = None
    tokens = 0
    async for event in stub.Generate(request, timeout=600):
        if event.token_ids and first is None:
            first = time.monotonic()
        tokens += len(event.token_ids)
    done = time.monotonic()
    return {"ttft": (first or done) - sent, "e2e": done - sent, "tokens": tokens, "done": done}


async def _replay(address: str, requests: list[MMRequest]) -> dict[str, float]:
    import grpc

    from stageserve.v1 import gateway_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        start = time.monotonic()
        results = await asyncio.gather(*(_one(stub, r, i, start) for i, r in enumerate(requests)))
    ttfts = sorted(r["ttft"] for r in results)
    span = max(r["done"] for r in results) - start
    return {
        "requests": len(results),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, math.ceil(0.99 * len(ttfts)) - 1)],
        "throughput_rps": len(results) / span,
        "output_tok_s": sum(r["tokens"] for r in results) / span,
        "makespan_s": span,
    }


def _overrides(args: argparse.Namespace, replicas: int, routing: str) -> dict[str, Any]:
    vision = {
        "vision_image_size": 32,
        "vision_patch_size": 8,
        "vision_hidden_size": args.vision_hidden,
        "vision_layers": args.vision_layers,
        "vision_heads": max(1, args.vision_hidden // 64),
    }
    return {
        "model": args.model,
        "kv_format": "bf16",
        "encoder": {"replicas": replicas, **vision},
        "gateway": {"image_routing": routing},
        "prefill": {"kv_cache_memory_bytes": 256 << 20},
        "decode": {"kv_cache_memory_bytes": 256 << 20},
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from stageserve.serving.supervisor import Supervisor, free_port_config

    requests = sample_requests(Path(args.data), args.chunk, args.num_requests, args.rate, args)
    images = sum(len(r.image_sizes) for r in requests)
    print(f"{len(requests)} requests, {images} images, over {requests[-1].arrival_s:.1f}s", file=sys.stderr)
    rows = []
    for replicas, routing in ((1, "least-pending"), (2, "round-robin"), (2, "least-pending")):
        config = free_port_config(**_overrides(args, replicas, routing))
        supervisor = Supervisor(config, startup_timeout_s=300.0, out=sys.stderr)
        try:
            endpoints = supervisor.start()
            warm = [MMRequest(0.0, 4, ((28, 28),), 1)]
            asyncio.run(_replay(endpoints.gateway_grpc, warm))
            result = asyncio.run(_replay(endpoints.gateway_grpc, requests))
        finally:
            supervisor.stop()
        row = {"encoders": replicas, "routing": routing, **result}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"`stageserve bench encoder --num-requests {args.num_requests} --rate {args.rate}` (chunk {args.chunk}, "
        f"seeded ViT {args.vision_layers}x{args.vision_hidden}, 16 tokens per 32-px tile)",
        "",
        "| encoders | routing | P50 TTFT (s) | P99 TTFT (s) | requests/s | output tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoders']} | {r['routing']} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
            f"{r['throughput_rps']:.3f} | {r['output_tok_s']:.2f} |"
        )
    return "\n".join(lines)


def add_bench_encoder_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "encoder", help="image requests from the ServeGen trace: 1 vs 2 encoders, least-pending vs round-robin"
    )
    p.add_argument("--data", default=str(DATA), help="servegen_mm_image directory")
    p.add_argument("--chunk", type=int, default=10, help="trace chunk (its first window's distributions)")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--rate", type=float, default=0.5, help="requests/s (the trace's burstiness is kept)")
    p.add_argument("--max-images", type=int, default=8)
    p.add_argument("--text-scale", type=float, default=1 / 32, help="multiplies trace text tokens")
    p.add_argument("--max-output", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=768)
    p.add_argument("--vision-layers", type=int, default=12)
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    rows = run(args)
    print(markdown(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
