"""Offline throughput, side by side: the stageserve engine vs transformers ``generate`` on the same requests.

Workload: requests sampled from the Azure LLM inference trace (2023), prompt and output lengths scaled
by ``scale`` (so a CPU run stays minutes, not hours) and capped to the model's context; prompt text is
WikiText-2 token ids, outputs are forced to their trace length (EOS ignored) on both sides.
Each system runs at batch 1 (one request at a time) and batched (``batch`` requests in flight: continuous
batching for stageserve, left-padded static batches for transformers).
"""

from __future__ import annotations

import csv
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stageserve.core.sampling import SamplingParams


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


@dataclass(frozen=True)
class BenchResult:
    system: str
    mode: str
    requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.seconds

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "output_tok_s": round(self.output_tps, 1), "prompt_tok_s": round(self.prompt_tps, 1)}


def sample_requests(
    trace_csv: str, corpus: list[int], num: int, scale: float, max_context: int, max_output: int, seed: int
) -> list[BenchRequest]:
    """Samples ``num`` rows of an Azure trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)."""
    with Path(trace_csv).open() as fh:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(fh)]
    rng = random.Random(seed)
    out = []
    for ctx, gen in rng.sample(rows, num):
        output_len = max(1, min(max_output, round(gen * scale)))
        prompt_len = max(1, min(max_context - output_len, round(ctx * scale)))
        start = rng.randrange(0, len(corpus) - prompt_len)
        out.append(BenchRequest(corpus[start : start + prompt_len], output_len))
    return out


def run_stageserve(llm: Any, requests: list[BenchRequest], batch: int) -> float:
    """Seconds to serve all requests with at most ``batch`` in flight (continuous batching)."""
    engine = llm.engine
    queue = list(requests)
    in_flight: set[str] = set()
    start = time.perf_counter()
    while queue or in_flight:
        while queue and len(in_flight) < batch:
            req = queue.pop(0)
            rid = engine.new_request_id()
            engine.add_request(rid, req.prompt_ids, SamplingParams(max_tokens=req.output_len, ignore_eos=True))
            in_flight.add(rid)
        for event in engine.step():
            if event.finished:
                in_flight.discard(event.request_id)
    return time.perf_counter() - start


@torch.inference_mode()
def run_transformers(model: Any, requests: list[BenchRequest], batch: int, pad_id: int) -> float:
    """Seconds for HF generate over static batches (left-padded, run to the batch's longest output)."""
    start = time.perf_counter()
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        width = max(len(r.prompt_ids) for r in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, r in enumerate(group):
            ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids) :] = 1
        new = max(r.output_len for r in group)
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return time.perf_counter() - start


def bench(llm: Any, hf_model: Any | None, requests: list[BenchRequest], batch: int) -> list[BenchResult]:
    prompt_tokens = sum(len(r.prompt_ids) for r in requests)
    output_tokens = sum(r.output_len for r in requests)
    pad = llm.tokenizer.pad_token_id or 0
    warmup = [BenchRequest(requests[0].prompt_ids[:32], 4)]  # first-call allocations stay out of the timings
    run_stageserve(llm, warmup, 1)
    if hf_model is not None:
        run_transformers(hf_model, warmup, 1, pad)
    results = []
    for mode, size in (("batch1", 1), (f"batch{batch}", batch)):
        results.append(
            BenchResult(
                "stageserve", mode, len(requests), prompt_tokens, output_tokens, run_stageserve(llm, requests, size)
            )
        )
        if hf_model is not None:
            results.append(
                BenchResult(
                    "transformers",
                    mode,
                    len(requests),
                    prompt_tokens,
                    output_tokens,
                    run_transformers(hf_model, requests, size, pad),
                )
            )
    return results
