"""What the observability hooks cost per request and per token, side by side in one process.

    python benchmarks/observability_overhead.py [--requests 2000] [--tokens 64]

A request is a stream of ``--tokens`` one-token deltas from an async generator. Three variants run the same
stream: ``bare`` (the generator only), ``metrics`` (the gateway's RequestTimer: TTFT/ITL/E2E histograms and a
request counter) and ``metrics+tracing`` (also the gateway's span around the stream via ``traced_stream``,
with a real SDK tracer provider whose span processor exports to an in-memory list, i.e. no network). The
difference to ``bare`` is the overhead the hooks add to every request.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from stageserve.serving.common import metrics, tracing


async def deltas(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


async def bare(tokens: int) -> None:
    async for _ in deltas(tokens):
        pass


async def with_metrics(tokens: int) -> None:
    timer = metrics.gateway_timer("bench")
    async for _ in deltas(tokens):
        timer.tokens(1, time.perf_counter())
    timer.finish(time.perf_counter())
    metrics.count_gateway_request("bench", "http", 200)


async def with_tracing(tokens: int) -> None:
    timer = metrics.gateway_timer("bench")
    span = tracing.start_span("chat bench", {"gen_ai.request.model": "bench"})

    def on_item(_: int) -> None:
        timer.tokens(1, time.perf_counter())

    async for _ in tracing.traced_stream(deltas(tokens), span, on_item):
        pass
    timer.finish(time.perf_counter())
    metrics.count_gateway_request("bench", "http", 200)


async def run(variant, requests: int, tokens: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(requests):
        await variant(tokens)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    metrics.enable("gateway")
    variants = {"bare": bare, "metrics": with_metrics, "metrics+tracing": with_tracing}
    best = {name: min(asyncio.run(run(v, args.requests, args.tokens)) for _ in range(args.repeats))
            for name, v in variants.items()}  # fmt: skip
    assert len(exporter.get_finished_spans()) == args.requests * args.repeats
    base = best["bare"]
    print(f"{args.requests} requests x {args.tokens} tokens, best of {args.repeats}")
    print(f"{'variant':<18}{'s':>8}{'us/request':>12}{'overhead us/request':>21}{'overhead us/token':>19}")
    for name, seconds in best.items():
        per_request = seconds / args.requests * 1e6
        extra = (seconds - base) / args.requests * 1e6
        print(f"{name:<18}{seconds:>8.3f}{per_request:>12.1f}{extra:>21.1f}{extra / args.tokens:>19.2f}")


if __name__ == "__main__":
    main()
