"""Bytes per token vs perplexity across KV formats, Π, V chunk size and K rotation (``stageserve eval kv-frontier``).

Two scorers give the perplexity of a cache configuration:

* ``decode``: ``LLMEngine.score_by_decode_steps``: every token is a decode step over the quantized paged
  cache (the served path; 1 step per token, slow on CPU).
* ``teacher``: one forward pass per window through :class:`TeacherForcedPages`, which gives query t exactly
  the cache that decode step t sees: key j is read quantized iff its page [S + iΠ, S + (i+1)Π) had closed
  before step t (its end ≤ t), and BF16 otherwise (sinks, the open block, the page t completes); closed pages
  hold the dequantized values rounded to BF16, as the cache stores them. K/V of token j are those of token
  j's own forward, as in the cache, so both scorers differ only by float rounding, which can flip a 2-bit
  code at a rounding boundary (checked in tests/engine/test_kv_accuracy.py); ``teacher`` is one forward
  pass per window instead of one engine step per token and is used for the search.

Bytes come from ``PageFormat`` (steady state: closed pages only; and the wire bytes of a 1K-token prompt).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from stageserve.kvcodec.format import PageFormat
from stageserve.kvcodec.rotation import format_roundtrip

__all__ = ["FrontierPoint", "TeacherForcedPages", "frontier", "format_table", "teacher_perplexity"]

# (layer, k [H, Π·J, d], v) -> dequantized k, v of J whole pages; one closed page = Π consecutive rows.
Roundtrip = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def format_pages(fmt: PageFormat) -> Roundtrip:
    """The page round trip of a ``PageFormat`` (what the quantize-on-append cache stores), per layer."""

    def run(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, rows, d = k.shape
        j = rows // fmt.page_size
        kp = k.reshape(h, j, fmt.page_size, d)
        vp = v.reshape(h, j, fmt.page_size, d)
        k_hat, v_hat = format_roundtrip(fmt, kp, vp)
        return k_hat.reshape(h, rows, d), v_hat.reshape(h, rows, d)

    return run


class TeacherForcedPages:
    """An ``AttentionStep`` for one window (positions 0..n-1) that reproduces the decode cache's view per query."""

    def __init__(self, n: int, page_size: int, num_sinks: int, roundtrip: Roundtrip) -> None:
        self.roundtrip = roundtrip
        self.num_pages = max(0, (n - num_sinks) // page_size)
        self.q_end = num_sinks + self.num_pages * page_size
        self.num_sinks = num_sinks
        pos = torch.arange(n)
        page_end = num_sinks + ((pos - num_sinks) // page_size + 1) * page_size
        quantized = (pos >= num_sinks) & (pos < self.q_end)
        # key j (column) is read quantized by query t (row) iff its page closed before step t
        self.use_q = quantized[None, :] & (page_end[None, :] <= pos[:, None])
        self.causal = pos[None, :] <= pos[:, None]

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kb = k.to(torch.bfloat16).float().transpose(0, 1)  # [H, n, d]: the cache stores BF16
        vb = v.to(torch.bfloat16).float().transpose(0, 1)
        kq, vq = kb.clone(), vb.clone()
        if self.num_pages:
            s, e = self.num_sinks, self.q_end
            k_hat, v_hat = self.roundtrip(layer, kb[:, s:e], vb[:, s:e])
            kq[:, s:e], vq[:, s:e] = k_hat.to(torch.bfloat16).float(), v_hat.to(torch.bfloat16).float()  # as stored
        group = q.shape[1] // k.shape[1]
        kb, vb, kq, vq = (x.repeat_interleave(group, 0) for x in (kb, vb, kq, vq))
        qh = q.float().transpose(0, 1)  # [Hq, n, d]
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = torch.where(self.use_q, qh @ kq.transpose(1, 2), qh @ kb.transpose(1, 2)) * scale
        p = F.softmax(scores.masked_fill(~self.causal, float("-inf")), dim=-1)
        out = (p * self.use_q) @ vq + (p * ~self.use_q) @ vb
        return out.transpose(0, 1).to(q.dtype)


@torch.inference_mode()
def teacher_perplexity(model: Any, windows: Sequence[Sequence[int]], page_size: int, roundtrip: Roundtrip,
                       num_sinks: int = 4) -> float:
    """Perplexity of ``windows`` with every query seeing the decode cache's view (see the module docstring)."""
    nll, count = 0.0, 0
    for w in windows:
        ids = torch.tensor(list(w))
        step = TeacherForcedPages(len(w), page_size, num_sinks, roundtrip)
        hidden = model(ids, torch.arange(len(w)), step)
        logp = torch.log_softmax(model.logits(hidden[:-1]).float(), dim=-1)
        nll -= float(logp.gather(1, ids[1:].unsqueeze(1)).double().sum())
        count += len(w) - 1
    return math.exp(nll / count)


@dataclass(frozen=True)
class FrontierPoint:
    format: str
    page_size: int
    v_chunk: int
    steady_ratio: float  # closed pages / BF16
    wire_1k_ratio: float  # a 1,024-token prompt on the wire (sinks, pages, 4-bit tail) / BF16
    cache_1k_ratio: float  # the same prompt in the decode cache (open block BF16) / BF16
    perplexity: float
    rise: float  # perplexity / baseline - 1


def point(fmt: PageFormat, num_layers: int, ppl: float, base: float) -> FrontierPoint:
    bf16 = fmt.bf16_request_bytes(1024, num_layers)
    return FrontierPoint(
        fmt.format,
        fmt.page_size,
        fmt.v_chunk,
        fmt.bytes_per_token_steady / fmt.bf16_bytes_per_token,
        fmt.request_bytes(1024, num_layers, wire=True) / bf16,
        fmt.request_bytes(1024, num_layers, wire=False) / bf16,
        ppl,
        ppl / base - 1,
    )


def frontier(
    model: Any,
    windows: Sequence[Sequence[int]],
    formats: Sequence[PageFormat],
    num_layers: int,
    progress: Callable[[FrontierPoint], None] | None = None,
) -> tuple[float, list[FrontierPoint]]:
    """(BF16-cache perplexity, one point per format), each measured by the teacher-forced scorer."""
    base = teacher_perplexity(model, windows, 64, lambda _l, k, v: (k, v))
    out = []
    for fmt in formats:
        ppl = teacher_perplexity(model, windows, fmt.page_size, format_pages(fmt), fmt.num_sinks)
        out.append(point(fmt, num_layers, ppl, base))
        if progress is not None:
            progress(out[-1])
    return base, out


def pareto(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """Points no other point beats on both steady bytes and perplexity."""
    return [
        p
        for p in points
        if not any(o.steady_ratio <= p.steady_ratio and o.perplexity < p.perplexity and o != p for o in points)
    ]


def format_table(base: float, points: Sequence[FrontierPoint]) -> str:
    """Markdown table, fewest steady bytes first; ``*`` marks the Pareto frontier."""
    front = set(pareto(points))
    lines = [
        f"BF16 cache perplexity: {base:.4f}",
        "| format | Π | V chunk | steady % BF16 | 1K prompt wire % | 1K cache % | perplexity | rise | frontier |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for p in sorted(points, key=lambda p: (p.steady_ratio, p.perplexity)):
        lines.append(
            f"| {p.format} | {p.page_size} | {p.v_chunk} | {100 * p.steady_ratio:.1f} | {100 * p.wire_1k_ratio:.1f} "
            f"| {100 * p.cache_1k_ratio:.1f} | {p.perplexity:.4f} | {100 * p.rise:+.2f} % "
            f"| {'*' if p in front else ''} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Agreement:
    prompts: int
    identical: int  # continuations token-identical to the reference
    mean_prefix: float  # mean length of the common greedy prefix
    token_match: float  # fraction of positions with the same token


def greedy_prompts(corpus_ids: Sequence[int], count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens taken at evenly spaced offsets of a token corpus."""
    stride = (len(corpus_ids) - length) // max(1, count - 1) if count > 1 else 0
    if len(corpus_ids) < length or stride < 0:
        raise ValueError(f"corpus of {len(corpus_ids)} tokens is too short for prompts of {length}")
    return [list(corpus_ids[i * stride : i * stride + length]) for i in range(count)]


def greedy_agreement(reference: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> Agreement:
    """Compares greedy continuations per prompt (same lengths) with the reference format's."""
    prefixes, same, total = [], 0, 0
    for a, b in zip(reference, outputs, strict=True):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        prefixes.append(diff[0] if diff else len(a))
        same += sum(x == y for x, y in zip(a, b, strict=True))
        total += len(a)
    identical = sum(p == len(a) for p, a in zip(prefixes, reference, strict=True))
    return Agreement(len(prefixes), identical, sum(prefixes) / max(1, len(prefixes)), same / max(1, total))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_frontier_parser(evsub: Any, data_default: str) -> None:
    """``stageserve eval kv-frontier``: hooked into the ``eval`` subcommands by cli.py."""
    p = evsub.add_parser("kv-frontier", help="bytes per token vs perplexity across KV formats, Π, V chunk, rotation")
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=data_default)
    p.add_argument("--tokens", type=int, default=2048, help="corpus tokens (8192 for the recorded table)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--formats", default="fp8,hack4,hack-k4v2,hack-k4v2r,hack2,hack2r")
    p.add_argument("--partitions", default="64", help="comma-separated Π values (32, 64, 128)")
    p.add_argument("--v-chunks", default="0", help="comma-separated V chunk sizes; 0 = min(Π, head_dim)")
    p.add_argument("--json", default=None, help="also write the points to this file")
    p.set_defaults(func=run_frontier_cli)


def run_frontier_cli(args: Any) -> int:
    import json
    from pathlib import Path

    from stageserve.models import load_model
    from stageserve.tools.eval_ppl import corpus_tokens, windows

    loaded = load_model(args.model)
    mc = loaded.config
    chunks = windows(corpus_tokens(loaded.tokenizer, args.data, args.tokens), args.window)
    formats = [
        PageFormat(name, mc.num_key_value_heads, mc.head_dim, page_size=pi, v_chunk=chunk)
        for name in args.formats.split(",")
        for pi in _ints(args.partitions)
        for chunk in _ints(args.v_chunks)
        if chunk == 0 or mc.head_dim % chunk == 0
    ]
    print(f"model: {mc.name}  tokens={args.tokens} window={args.window} windows={len(chunks)}  scorer: teacher-forced")

    def show(p: FrontierPoint) -> None:
        print(f"  {p.format:<11} Π={p.page_size:<3} chunk={p.v_chunk:<3} steady {100 * p.steady_ratio:5.1f} %  "
              f"ppl {p.perplexity:.4f} ({100 * p.rise:+.2f} %)", flush=True)

    base, points = frontier(loaded.model, chunks, formats, mc.num_hidden_layers, show)
    print(format_table(base, points))
    if args.json:
        rows = [dict(p.__dict__) for p in points]
        Path(args.json).write_text(json.dumps({"bf16_cache_ppl": base, "points": rows}, indent=2))
    return 0
