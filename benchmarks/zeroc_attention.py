"""Attention time per decode step and prefill time at each ZeroC rank, side by side in one run.

    .venv/bin/python benchmarks/zeroc_attention.py --ranks 64,64 48,64 48,48 32,32 --batch 8 --context 1024

Decode: the engine's real ``TorchAttentionBackend`` over a ``PagedKVCache`` with the plan's per-layer dims;
one plan per step for ``batch`` sequences of ``context`` tokens, q/k/v random; the time is the sum over all
layers of ``step.run`` (cache write + gather + SDPA). Prefill: the same attention, one causal chunk of
``--prefill`` tokens per layer. Dims only matter here, so plans are uniform (R_QK, R_V) applied to the model
shape; reps are interleaved across plans and timed in process CPU time (1 thread), so a shared, loaded
machine distorts them less than wall time. Medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stageserve.engine.attention import SeqChunk, TorchAttentionBackend
from stageserve.engine.kv_cache import PagedKVCache
from stageserve.models.loader import read_model_config


def _setup(cfg, dims, batch, context, block):
    blocks_per_seq = -(-(context + 1) // block)
    cache = PagedKVCache(
        cfg.num_hidden_layers,
        batch * blocks_per_seq,
        block,
        cfg.num_key_value_heads,
        cfg.head_dim,
        torch.float32,
        head_dims=dims,
    )
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    return TorchAttentionBackend(cache), tables


def _time_layers(backend, chunks, cfg, dims, rows):
    step = backend.plan(chunks)
    gen = torch.Generator().manual_seed(0)
    t = 0.0
    for layer, (dk, dv) in enumerate(dims):
        q = torch.randn(rows, cfg.num_attention_heads, dk, generator=gen)
        k = torch.randn(rows, cfg.num_key_value_heads, dk, generator=gen)
        v = torch.randn(rows, cfg.num_key_value_heads, dv, generator=gen)
        t0 = time.process_time()
        step.run(layer, q, k, v)
        t += time.process_time() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--ranks", nargs="+", default=["64,64", "48,64", "48,48", "32,32"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = read_model_config(args.model)
    plans = {r: [tuple(int(x) for x in r.split(","))] * cfg.num_hidden_layers for r in args.ranks}
    decode = {r: [] for r in plans}
    prefill = {r: [] for r in plans}
    setups = {r: _setup(cfg, d, args.batch, max(args.context, args.prefill), 16) for r, d in plans.items()}
    for _ in range(args.reps):
        for r, dims in plans.items():
            backend, tables = setups[r]
            dchunks = [SeqChunk(i, 1, args.context, tables[i]) for i in range(args.batch)]
            decode[r].append(_time_layers(backend, dchunks, cfg, dims, args.batch))
            pchunks = [SeqChunk(0, args.prefill, 0, tables[0])]
            prefill[r].append(_time_layers(backend, pchunks, cfg, dims, args.prefill))
    base = args.ranks[0]
    print(
        f"{cfg.name}: {cfg.num_hidden_layers} layers, Hq={cfg.num_attention_heads}, Hkv={cfg.num_key_value_heads}, "
        f"d={cfg.head_dim}; decode batch {args.batch} x context {args.context}; prefill {args.prefill} tokens; "
        f"1 thread; median of {args.reps}"
    )
    print("| r_qk,r_v | KV values vs d | decode attention ms/step | ratio | prefill attention ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for r, dims in plans.items():
        dk, dv = dims[0]
        dm, pm = statistics.median(decode[r]) * 1e3, statistics.median(prefill[r]) * 1e3
        print(
            f"| {r} | {(dk + dv) / (2 * cfg.head_dim):.3f} | {dm:.2f} | "
            f"{dm / (statistics.median(decode[base]) * 1e3):.2f} | {pm:.1f} | "
            f"{pm / (statistics.median(prefill[base]) * 1e3):.2f} |"
        )


if __name__ == "__main__":
    main()
