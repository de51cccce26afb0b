"""ZeroC perplexity vs KV bytes: ZeroC alone, HACK alone, ZeroC+HACK, on the eval half of wikitext-2.

    .venv/bin/python benchmarks/zeroc_curve.py --tokens 2048 --plans-from DIR [DIR ...] --uniform 48,64 56,56 \
        --methods paper whitened --formats none hack2

Calibrates once per method on the first half of ../shared/data/wikitext2/test.txt (``--calib-tokens``), applies
each rank plan in memory (uniform ``R_QK,R_V`` plans and the searched plans read from compressed dirs'
zeroc.json), and scores the second half with K/V as each page format stores them (``none``: model dtype;
``bf16``/``fp8``/``hack2``/...: every full 64-token page quantized, sinks and the open block BF16: all queries
see quantized pages, slightly pessimistic vs the decode cache). KV bytes per token are steady-state page bytes
over all layers (``models.zeroc.page_bytes_per_token``). Prints one markdown row per (method, plan, format).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stageserve.models.loader import load_model
from stageserve.models.zeroc import RankPlan, ZeroCModel, calibrate, page_bytes_per_token
from stageserve.tools.compress_zeroc import DEFAULT_DATA, parse_plan, scorer
from stageserve.tools.eval_ppl import corpus_split_tokens, perplexity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--skip", type=int, default=0, help="skip this many eval-half tokens first (e.g. the search set)")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--uniform", nargs="*", default=[])
    ap.add_argument("--plans-from", nargs="*", default=[])
    ap.add_argument("--methods", nargs="*", default=["whitened"])
    ap.add_argument("--formats", nargs="*", default=["none", "hack2"])
    ap.add_argument("--base", action="store_true", help="also score the uncompressed model in each format")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    cfg = loaded.config
    ids = corpus_split_tokens(loaded.tokenizer, DEFAULT_DATA, "eval", args.skip + args.tokens)[args.skip :]
    calib = corpus_split_tokens(loaded.tokenizer, DEFAULT_DATA, "calib", args.calib_tokens)
    fmts = [None if f == "none" else f for f in args.formats]
    print(
        f"model {loaded.name}; eval half, tokens [{args.skip}, {args.skip + args.tokens}), "
        f"windows of {args.window}; calib {args.calib_tokens}"
    )
    print("| method | plan | KV format | KV bytes/token | vs bf16 | ppl |")
    print("|---|---|---|---:|---:|---:|")
    full = page_bytes_per_token(None, cfg, "bf16")

    def row(method: str, label: str, plan: RankPlan | None, model: torch.nn.Module) -> None:
        for fmt in fmts:
            t0 = time.time()
            ppl = perplexity(scorer(model, fmt), ids, args.window).perplexity
            kv = page_bytes_per_token(plan, cfg, fmt or "bf16")
            name = fmt or "bf16 (model dtype cache)"
            cells = f"| {method} | {label} | {name} | {kv:.0f} | {kv / full:.3f} | {ppl:.4f} |"
            print(f"{cells}  <!-- {time.time() - t0:.0f}s -->", flush=True)

    if args.base:
        row("none", "full (64/64)", None, loaded.model)
    plans: list[tuple[str, RankPlan]] = [(f"uniform {u}", parse_plan(u, cfg.num_hidden_layers)) for u in args.uniform]
    for d in args.plans_from:
        meta = json.loads((Path(d) / "zeroc.json").read_text())
        plan = RankPlan(tuple(meta["ranks"]["qk"]), tuple(meta["ranks"]["v"]))
        method = meta.get("calibration", {}).get("method", "paper")
        plans.append((f"searched {Path(d).name} [{method}]", plan))
    for method in args.methods:
        zc = ZeroCModel(loaded.model, calibrate(loaded.model, calib, args.window, method=method))
        for label, plan in plans:
            if "searched" in label and f"[{method}]" not in label:
                continue
            zc.apply(plan)
            row(method, f"{label} (KV x{plan.kv_fraction(cfg.head_dim):.3f})", plan, loaded.model)
        zc.restore()


if __name__ == "__main__":
    main()
