"""Attention over the paged KV cache: ``plan()`` once per engine step, ``run()`` once per layer.

This is the seam every KV format plugs into: a backend turns the step's sequences into gather indices
and masks once, then each layer writes its new K/V into the cache and attends. The torch backend
batches all decoding sequences (one query each) into one padded SDPA call per layer, and runs each
prefill chunk as its own causal SDPA (reading earlier context from the cache when there is some).

Shapes: T tokens in the step; q [T, Hq, D]; k, v [T, Hkv, D]; output [T, Hq, D].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stageserve.engine.kv_cache import PagedKVCache

# (layer, first position, k [n, Hkv, D], v [n, Hkv, D]) for one request's newly produced KV rows.
KVSink = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass
class SeqChunk:
    """One sequence's share of a step: its rows [row_start, row_start + q_len) are positions
    [start_pos, start_pos + q_len); afterwards its context holds start_pos + q_len tokens."""

    row_start: int
    q_len: int
    start_pos: int
    block_table: list[int]
    kv_sink: KVSink | None = None
    export_from: int = 0  # first position not yet handed to kv_sink

    @property
    def context_len(self) -> int:
        return self.start_pos + self.q_len


@dataclass
class _Export:
    sink: KVSink
    start: int
    slots: torch.Tensor


@dataclass
class _Prefill:
    rows: slice
    kv_slots: torch.Tensor | None  # None: no earlier context, attend to this chunk's own k/v
    mask: torch.Tensor | None  # [q_len, L] bool, True = attend; None = plain causal


class TorchAttentionStep:
    def __init__(self, cache: PagedKVCache, chunks: list[SeqChunk], sliding_window: int | None) -> None:
        self.cache = cache
        self.slot_mapping = (
            torch.cat([cache.slots_for(c.block_table, c.start_pos, c.context_len) for c in chunks])
            if chunks
            else torch.empty(0, dtype=torch.long)
        )
        decodes = [c for c in chunks if c.q_len == 1 and c.start_pos > 0]
        self.decode_rows = torch.tensor([c.row_start for c in decodes], dtype=torch.long)
        self.decode_slots, self.decode_mask = _padded_context(cache, decodes, sliding_window)
        self.prefills = [
            _plan_prefill(cache, c, sliding_window) for c in chunks if not (c.q_len == 1 and c.start_pos > 0)
        ]
        self.exports = [
            _Export(c.kv_sink, max(c.export_from, 0), cache.slots_for(c.block_table, c.export_from, c.context_len))
            for c in chunks
            if c.kv_sink is not None and c.context_len > c.export_from
        ]

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.slot_mapping, k, v)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # V may have fewer dims than q/k (ZeroC)
        if len(self.decode_rows):
            qd = q[self.decode_rows].unsqueeze(2)  # [B, Hq, 1, D]
            kd = k_cache[self.decode_slots].transpose(1, 2)  # [B, Hkv, L, D]
            vd = v_cache[self.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask, enable_gqa=True)
            out[self.decode_rows] = od.squeeze(2)
        for p in self.prefills:
            qp = q[p.rows].transpose(0, 1)  # [Hq, n, D]
            if p.kv_slots is None:
                kp, vp = k[p.rows].transpose(0, 1), v[p.rows].transpose(0, 1)
            else:
                kp, vp = k_cache[p.kv_slots].transpose(0, 1), v_cache[p.kv_slots].transpose(0, 1)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=True)
            out[p.rows] = op.transpose(0, 1)
        for e in self.exports:
            e.sink(layer, e.start, k_cache[e.slots], v_cache[e.slots])
        return out


def _padded_context(
    cache: PagedKVCache, decodes: list[SeqChunk], window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if not decodes:
        return torch.empty(0, 0, dtype=torch.long), torch.empty(0, dtype=torch.bool)
    longest = max(c.context_len for c in decodes)
    slots = torch.zeros(len(decodes), longest, dtype=torch.long)
    mask = torch.zeros(len(decodes), 1, 1, longest, dtype=torch.bool)
    for i, c in enumerate(decodes):
        slots[i, : c.context_len] = cache.slots_for(c.block_table, 0, c.context_len)
        first = 0 if window is None else max(0, c.context_len - window)
        mask[i, 0, 0, first : c.context_len] = True
    return slots, mask


def _plan_prefill(cache: PagedKVCache, c: SeqChunk, window: int | None) -> _Prefill:
    rows = slice(c.row_start, c.row_start + c.q_len)
    windowed = window is not None and c.context_len > window
    if c.start_pos == 0 and not windowed:
        return _Prefill(rows, None, None)
    key_pos = torch.arange(c.context_len)
    query_pos = torch.arange(c.start_pos, c.context_len).unsqueeze(1)
    mask = key_pos <= query_pos
    if windowed:
        mask &= key_pos > query_pos - window
    return _Prefill(rows, cache.slots_for(c.block_table, 0, c.context_len), mask)


class TorchAttentionBackend:
    """Plain-torch attention (the CPU serving path and the reference the kernels are tested against)."""

    name = "torch"

    def __init__(self, cache: PagedKVCache, sliding_window: int | None = None) -> None:
        self.cache = cache
        self.sliding_window = sliding_window

    def plan(self, chunks: list[SeqChunk]) -> TorchAttentionStep:
        return TorchAttentionStep(self.cache, chunks, self.sliding_window)


class NoCacheAttention:
    """Causal attention over a single sequence without touching any cache (scoring / perplexity)."""

    def __init__(self, sliding_window: int | None = None) -> None:
        self.sliding_window = sliding_window

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        mask = None
        if self.sliding_window is not None and n > self.sliding_window:
            pos = torch.arange(n)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.sliding_window)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )
        return out.transpose(0, 1)
