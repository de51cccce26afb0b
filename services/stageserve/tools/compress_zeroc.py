"""``stageserve compress zeroc``: calibrate ZeroC bases and search per-layer ranks under a perplexity budget.

Data split (the default for every ZeroC evaluation): calibration on the first half of
``../shared/data/wikitext2/test.txt``, perplexity only on tokens of the second half (``eval_ppl.corpus_split_tokens``).

Rank search [ours; papers.md §2.4 sketches it]: every 8-value cut of a layer's Q/K or V rank is a candidate;
its cost is the energy it drops (E(r+8) − E(r), mean over KV heads) times a per-kind weight measured on real
perplexity (one uniform Q/K cut, one uniform V cut: V is far more sensitive). Cuts are taken cheapest first
(per layer and kind in order), and a bisection over how many cuts to take measures REAL perplexity on the
search tokens at each probe, keeping the largest compression whose rise stays within the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from stageserve.kvcodec.reference import roundtrip_page
from stageserve.models.loader import LoadedModel
from stageserve.models.zeroc import METHODS, Bases, RankPlan, ZeroCModel, calibrate, save_compressed
from stageserve.tools.eval_ppl import corpus_split_tokens, perplexity

DEFAULT_DATA = "../shared/data/wikitext2/test.txt"
STEP = 8


@dataclass(frozen=True)
class Cut:
    layer: int
    kind: str  # "qk" | "v"
    rank: int  # rank after the cut
    cost: float


@dataclass
class SearchLog:
    base_ppl: float
    probes: list[dict[str, Any]] = field(default_factory=list)


class PagedQuantAttention:
    """Scoring attention whose K/V are what a page format stores: sinks and the open block BF16, every full
    page of Π tokens quantized (``kvcodec.reference.roundtrip_page``). All queries see the quantized pages,
    so this is slightly pessimistic vs the decode cache (where a page is quantized once it fills)."""

    def __init__(self, fmt: str | None, page_size: int = 64, sinks: int = 4) -> None:
        self.fmt, self.page_size, self.sinks = fmt, page_size, sinks

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fmt is not None:
            k, v = _roundtrip(self.fmt, self.page_size, self.sinks, k, v)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
        )
        return out.transpose(0, 1)


def _roundtrip(fmt: str, page_size: int, sinks: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    from stageserve.kvcodec.format import PageFormat

    n = k.shape[0]
    pages = max(0, (n - sinks) // page_size)
    k_out, v_out = k.to(torch.bfloat16).to(k.dtype), v.to(torch.bfloat16).to(v.dtype)
    if fmt in ("bf16", None) or pages == 0:
        return k_out, v_out
    lo, hi = sinks, sinks + pages * page_size
    h = k.shape[1]
    kp = k[lo:hi].reshape(pages, page_size, h, -1).permute(2, 0, 1, 3)  # [H, P, Π, d]
    vp = v[lo:hi].reshape(pages, page_size, h, -1).permute(2, 0, 1, 3)
    kfmt = PageFormat(fmt, h, k.shape[-1], page_size=page_size)
    vfmt = PageFormat(fmt, h, v.shape[-1], page_size=page_size)
    kq, _ = roundtrip_page(kp, kp, fmt, (kfmt.bits_k, kfmt.bits_k), kfmt.v_chunk)
    _, vq = roundtrip_page(vp, vp, fmt, (vfmt.bits_v, vfmt.bits_v), vfmt.v_chunk)
    k_out = k_out.clone()
    v_out = v_out.clone()
    k_out[lo:hi] = kq.permute(1, 2, 0, 3).reshape(hi - lo, h, -1).to(k.dtype)
    v_out[lo:hi] = vq.permute(1, 2, 0, 3).reshape(hi - lo, h, -1).to(v.dtype)
    return k_out, v_out


def scorer(model: Any, kv_format: str | None = None, page_size: int = 64) -> Callable[[list[int]], torch.Tensor]:
    """Per-token log-probs of a window, attention over K/V as ``kv_format`` pages store them (None: as is)."""

    @torch.inference_mode()
    def score(chunk: list[int]) -> torch.Tensor:
        ids = torch.tensor(chunk)
        step = PagedQuantAttention(kv_format, page_size)
        hidden = model(ids, torch.arange(len(chunk)), step)
        logprobs = torch.log_softmax(model.logits(hidden[:-1]), dim=-1)
        return logprobs.gather(1, ids[1:].unsqueeze(1)).squeeze(1)

    return score


def candidate_cuts(bases: Bases, num_layers: int, head_dim: int, weights: dict[str, float], min_rank: int) -> list[Cut]:
    """All cuts, cheapest first; within one (layer, kind) the cuts stay in order (deeper cuts cost more)."""
    cuts = []
    for layer in range(num_layers):
        for kind in ("qk", "v"):
            energy = "qk" if kind == "qk" else "vo"
            for rank in range(head_dim - STEP, min_rank - 1, -STEP):
                lost = bases.kept_energy(layer, energy, rank + STEP) - bases.kept_energy(layer, energy, rank)
                cuts.append(Cut(layer, kind, rank, weights[kind] * lost))
    cuts.sort(key=lambda c: (c.cost, -c.rank))
    return cuts


def plan_from_cuts(cuts: list[Cut], num_layers: int, head_dim: int) -> RankPlan:
    qk, v = [head_dim] * num_layers, [head_dim] * num_layers
    for c in cuts:
        ranks = qk if c.kind == "qk" else v
        ranks[c.layer] = min(ranks[c.layer], c.rank)
    return RankPlan(tuple(qk), tuple(v))


def uniform_lost_energy(bases: Bases, num_layers: int, kind: str, rank: int, head_dim: int) -> float:
    energy = "qk" if kind == "qk" else "vo"
    return sum(1 - bases.kept_energy(layer, energy, rank) for layer in range(num_layers))


def search(
    zc: ZeroCModel,
    eval_ids: list[int],
    window: int,
    budget: float,
    min_rank: int = 16,
    log: Callable[[str], None] = print,
    budget_rel: float | None = None,
) -> tuple[RankPlan, SearchLog]:
    """Bisection over the energy-ordered cut list, measuring real perplexity at each probe (see module doc)."""
    cfg = zc.model.config
    layers, d = cfg.num_hidden_layers, cfg.head_dim

    def ppl(plan: RankPlan) -> float:
        zc.apply(plan)
        return perplexity(scorer(zc.model), eval_ids, window).perplexity

    zc.restore()
    base = perplexity(scorer(zc.model), eval_ids, window).perplexity
    slog = SearchLog(base)
    if budget_rel is not None:
        budget = base * budget_rel
    log(f"base ppl {base:.4f} on {len(eval_ids)} search tokens; budget +{budget:.4f}")
    weights = {}
    probe_rank = d - 2 * STEP
    for kind in ("qk", "v"):
        plan = RankPlan.uniform(layers, probe_rank if kind == "qk" else d, probe_rank if kind == "v" else d)
        rise = ppl(plan) - base
        lost = uniform_lost_energy(zc.bases, layers, kind, probe_rank, d)
        weights[kind] = max(rise, 1e-6) / max(lost, 1e-12)
        slog.probes.append({"plan": f"uniform {kind}={probe_rank}", "kv_fraction": plan.kv_fraction(d), "rise": rise})
        log(f"uniform {kind}={probe_rank}: +{rise:.4f} ppl (weight {weights[kind]:.3f} per unit of lost energy)")
    cuts = candidate_cuts(zc.bases, layers, d, weights, min_rank)
    lo, hi = 0, len(cuts)  # invariant: prefix lo is within budget
    best = plan_from_cuts([], layers, d)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        plan = plan_from_cuts(cuts[:mid], layers, d)
        rise = ppl(plan) - base
        slog.probes.append({"cuts": mid, "kv_fraction": plan.kv_fraction(d), "rise": rise})
        log(f"{mid} cuts: KV x{plan.kv_fraction(d):.3f}, +{rise:.4f} ppl")
        if rise <= budget:
            lo, best = mid, plan
        else:
            hi = mid
    return best, slog


def compress(
    loaded: LoadedModel,
    out: str,
    budget: float,
    calib_tokens: int,
    search_tokens: int,
    window: int,
    data: str = DEFAULT_DATA,
    plan: RankPlan | None = None,
    min_rank: int = 16,
    budget_rel: float | None = None,
    method: str = "paper",
) -> dict[str, Any]:
    """Calibrates, searches (unless ``plan`` is given) and writes the compressed directory; returns a summary."""
    t0 = time.time()
    calib = corpus_split_tokens(loaded.tokenizer, data, "calib", calib_tokens)
    bases = calibrate(loaded.model, calib, window, progress=True, method=method)
    zc = ZeroCModel(loaded.model, bases)
    slog = None
    if plan is None:
        eval_ids = corpus_split_tokens(loaded.tokenizer, data, "eval", search_tokens)
        plan, slog = search(zc, eval_ids, window, budget, min_rank, budget_rel=budget_rel)
    zc.apply(plan)
    cfg = loaded.config
    provenance = {
        "source_model": loaded.path,
        "source_name": loaded.name,
        "calibration": {
            "data": data,
            "split": "calib (first half)",
            "tokens": calib_tokens,
            "window": window,
            "method": method,
        },
        "search": None
        if slog is None
        else {
            "split": "eval (second half)",
            "tokens": search_tokens,
            "budget_ppl": budget if budget_rel is None else slog.base_ppl * budget_rel,
            "base_ppl": slog.base_ppl,
            "probes": slog.probes,
        },
        "energy_kept": {
            "qk": [bases.kept_energy(i, "qk", r) for i, r in enumerate(plan.qk)],
            "vo": [bases.kept_energy(i, "vo", r) for i, r in enumerate(plan.v)],
        },
        "seconds": round(time.time() - t0, 1),
    }
    save_compressed(loaded.model, loaded.tokenizer, plan, out, provenance)
    return {
        "out": out,
        "ranks_qk": list(plan.qk),
        "ranks_v": list(plan.v),
        "kv_fraction": round(plan.kv_fraction(cfg.head_dim), 4),
        "base_search_ppl": None if slog is None else round(slog.base_ppl, 4),
        "seconds": provenance["seconds"],
    }


def parse_plan(text: str, num_layers: int) -> RankPlan:
    """``"48,64"`` (uniform r_qk, r_v) -> RankPlan."""
    try:
        r_qk, r_v = (int(x) for x in text.split(","))
    except ValueError as exc:
        raise ValueError(f"--ranks: expected 'R_QK,R_V', got {text!r}") from exc
    return RankPlan.uniform(num_layers, r_qk, r_v)


# ---- CLI ---------------------------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    """``stageserve compress zeroc --model M --out DIR [--budget-ppl 0.1] [--calib-tokens N]``."""
    p = sub.add_parser("compress", help="offline model compression")
    csub = p.add_subparsers(dest="compress_command", required=True)
    z = csub.add_parser("zeroc", help="ZeroC: SVD-rotate Q/K and V, per-layer ranks under a perplexity budget")
    z.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M)")
    z.add_argument("--out", required=True, help="output directory (loadable with --model DIR)")
    z.add_argument("--budget-ppl", type=float, default=0.1, help="allowed perplexity rise (absolute)")
    z.add_argument("--budget-rel", type=float, default=None, help="allowed rise as a fraction of the base ppl")
    z.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (first half of --data)")
    z.add_argument("--search-tokens", type=int, default=2048, help="search-time eval tokens (second half)")
    z.add_argument("--window", type=int, default=1024)
    z.add_argument("--min-rank", type=int, default=16)
    z.add_argument("--ranks", default=None, help="skip the search: uniform 'R_QK,R_V' (e.g. 48,64)")
    z.add_argument("--data", default=DEFAULT_DATA)
    z.add_argument(
        "--method",
        choices=list(METHODS),
        default="paper",
        help="paper: orthonormal SVD bases (arXiv 2408.04107 v1); whitened: best rank-r Q·Kᵀ and V·W_o [ours]",
    )
    z.set_defaults(func=_compress_zeroc)


def _compress_zeroc(args: Any) -> int:
    import json

    from stageserve.models.loader import load_model

    for name in ("calib_tokens", "search_tokens", "window"):
        if getattr(args, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 2")
    if args.budget_ppl < 0 or (args.budget_rel is not None and args.budget_rel < 0):
        raise ValueError("--budget-ppl/--budget-rel: must be >= 0")
    loaded = load_model(args.model, torch.float32)
    plan = parse_plan(args.ranks, loaded.config.num_hidden_layers) if args.ranks else None
    if plan is not None:
        plan.validate(loaded.config)
    summary = compress(
        loaded,
        args.out,
        args.budget_ppl,
        args.calib_tokens,
        args.search_tokens,
        args.window,
        args.data,
        plan,
        args.min_rank,
        args.budget_rel,
        args.method,
    )
    print(json.dumps(summary, indent=2))
    return 0
