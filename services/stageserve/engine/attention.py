"""Attention over the paged KV cache: ``plan()`` once per engine step, ``run()`` once per layer.

This is the seam every KV format plugs into: a backend turns the step's sequences into gather indices
and masks once, then each layer writes its new K/V into the cache and attends. The torch backend
batches all decoding sequences (one query each) into one padded SDPA call per layer, and runs each
prefill chunk as its own causal SDPA (reading earlier context from the cache when there is some).
With a code pool (``EngineConfig.kv_store="codes"``) a decoding sequence whose chunk carries ``SeqCodes``
attends on the packed codes of its closed pages (``kvcodec.paged.paged_decode_attention_torch``; kivi2:
``dequant_decode_attention_torch``) plus its dense BF16 rows (sinks, open block, restored wire tail) gathered
from the cache; prefill chunks keep the dense path.

Shapes: T tokens in the step; q [T, Hq, D]; k, v [T, Hkv, D]; output [T, Hq, D].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stageserve.engine.kv_cache import PagedKVCache
from stageserve.engine.kv_quant import CodePool, SeqCodes
from stageserve.kvcodec.paged import dequant_decode_attention_torch, paged_decode_attention_torch
from stageserve.kvcodec.rotation import rotate

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
    codes: SeqCodes | None = None  # closed pages in the code store (kv_store="codes")

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


@dataclass
class _CodeDecodes:
    """Decoding sequences that attend on codes: their rows, page tables and dense rows (valid ones first)."""

    rows: torch.Tensor  # [B]
    page_tables: torch.Tensor  # [B, maxP]
    num_pages: torch.Tensor  # [B]
    dense_slots: torch.Tensor  # [B, n]
    dense_lens: torch.Tensor  # [B]


def _plan_code_decodes(cache: PagedKVCache, chunks: list[SeqChunk]) -> _CodeDecodes:
    pages = max(len(c.codes.page_ids) for c in chunks)
    tables = torch.zeros(len(chunks), max(pages, 1), dtype=torch.long)
    dense: list[torch.Tensor] = []
    for i, c in enumerate(chunks):
        tables[i, : len(c.codes.page_ids)] = torch.tensor(c.codes.page_ids, dtype=torch.long)
        keep = torch.ones(c.context_len, dtype=torch.bool)
        for s in c.codes.starts:
            keep[s : s + c.codes.page_size] = False
        dense.append(cache.slots_for(c.block_table, 0, c.context_len)[keep])
    lens = torch.tensor([len(d) for d in dense], dtype=torch.long)
    slots = torch.zeros(len(chunks), int(lens.max()), dtype=torch.long)
    for i, d in enumerate(dense):
        slots[i, : len(d)] = d
    return _CodeDecodes(
        torch.tensor([c.row_start for c in chunks], dtype=torch.long),
        tables,
        torch.tensor([len(c.codes.page_ids) for c in chunks], dtype=torch.long),
        slots,
        lens,
    )


class TorchAttentionStep:
    def __init__(
        self,
        cache: PagedKVCache,
        chunks: list[SeqChunk],
        sliding_window: int | None,
        pool: CodePool | None = None,
    ) -> None:
        self.cache = cache
        self.pool = pool if sliding_window is None else None
        on_codes = [c for c in chunks if self.pool is not None and _decodes_on_codes(c, self.pool)]
        self.code_decodes = _plan_code_decodes(cache, on_codes) if on_codes else None
        chunks_dense = [c for c in chunks if not any(c is o for o in on_codes)]
        self.slot_mapping = (
            torch.cat([cache.slots_for(c.block_table, c.start_pos, c.context_len) for c in chunks])
            if chunks
            else torch.empty(0, dtype=torch.long)
        )
        decodes = [c for c in chunks_dense if c.q_len == 1 and c.start_pos > 0]
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
        if self.code_decodes is not None:
            out[self.code_decodes.rows] = self._run_codes(layer, q).to(out.dtype)
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

    def _run_codes(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        cd, store = self.code_decodes, self.pool.store
        rot = store.fmt.k_rotation
        qc = rotate(q[cd.rows], rot)
        kd = rotate(self.cache.k[layer][cd.dense_slots], rot)  # [B, n, Hkv, D]
        vd = self.cache.v[layer][cd.dense_slots]
        none = kd[:, :0]
        zero = torch.zeros_like(cd.dense_lens)
        attend = paged_decode_attention_torch if store.fmt.computes_on_codes else dequant_decode_attention_torch
        return attend(qc, store, layer, cd.page_tables, cd.num_pages, none, none, zero, kd, vd, cd.dense_lens, None)


def _decodes_on_codes(c: SeqChunk, pool: CodePool) -> bool:
    """A decode step whose closed pages all lie in the code store (before its own position)."""
    return (
        c.q_len == 1
        and c.start_pos > 0
        and c.codes is not None
        and bool(c.codes.page_ids)
        and c.codes.page_size == pool.fmt.page_size
        and all(s + c.codes.page_size <= c.start_pos for s in c.codes.starts)
    )


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

    def __init__(self, cache: PagedKVCache, sliding_window: int | None = None, pool: CodePool | None = None) -> None:
        self.cache = cache
        self.sliding_window = sliding_window
        self.pool = pool  # code store of closed pages (kv_store="codes"); decode steps with SeqCodes use it

    def plan(self, chunks: list[SeqChunk]) -> TorchAttentionStep:
        return TorchAttentionStep(self.cache, chunks, self.sliding_window, self.pool)


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
