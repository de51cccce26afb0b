"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stageserve.core.sampling import SamplingParams


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    banned: Sequence[Sequence[int]],
) -> list[int]:
    """logits [B, V] float32 -> one token id per row. ``banned[i]`` ids get -inf (min_tokens not reached)."""
    for i, ids in enumerate(banned):
        if ids:
            logits[i, list(ids)] = float("-inf")
    chosen = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            chosen[i] = _sample_row(logits[i], p, generators[i])
    return chosen


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
