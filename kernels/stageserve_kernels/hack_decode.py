"""HACK paged decode attention on the packed 2/4-bit codes (Triton), GQA, split-K + log-sum-exp combine.

Math (papers.md HACK §1.4, the same as ``stageserve.kvcodec.paged.paged_decode_attention_torch``), per page
and per group of G query heads sharing a KV head, with q pre-scaled by 1/√d:

* QK: q̃ = q ⊙ k_scale; per channel chunk c (p channels) q̃ ≈ s_q·q′ + m_q with q′ ∈ [0, 255];
  score[n] = Σ_c (s_q[c]·Σ_{i∈c} q′_i k′[n,i] + m_q[c]·k_sums[n,c]) + q·k_min.
* PV: p = exp(s − running max); per chunk c, p̃ = p ⊙ v_scale[:, c] ≈ s_p·p′ + m_p over the page's Π tokens;
  out[i∈c] = s_p[c]·Σ_n p′[n] v′[n,i] + m_p[c]·v_sums[i] + Σ_n p[n]·v_min[n,c].

The integer dots run as FP16 tensor-core MMAs with FP32 accumulation: codes ≤ 255 and ≤ 15 are exact in FP16
and every partial sum (≤ 255·15·128 < 2^24) is exact in FP32, so they equal INT8 dots. Grid:
(B·Hkv, splits + 1): program s < splits walks its range of pages with one online softmax; program
``splits`` handles the BF16 rows (sinks, then the open block). ``_common.combine`` merges the splits.

Cost per decode step and KV head (T tokens in pages, G query heads, d, bits b): bytes ≈ T·(2·d·b/8 +
4·d/Π + 5·d/p + ...) = ``PageFormat.layer_page_bytes``/Π per token (the roofline input), FLOPs ≈ 4·G·T·d
per chunk pass (QK and PV; this kernel issues d/p chunk passes of the full width, so 4·G·T·d·(d/p)).

Known costs, not yet measured on a GPU (none was available): (1) each chunk's dots run over the full width
with the other chunks' columns masked, so MMA work is ×(d/p) (×2 at d=128, Π=64); (2) the query tile is
padded to 16 rows (G=4 for Llama-8B: 4× idle MMA rows); (3) the packed bytes are gathered once per code
(8/b loads per byte, L1 hits); (4) q̃ and p̃ are re-quantized per page with masked full-width reductions.
Candidates: per-chunk code tiles with a [BG, d/p, p] accumulator, several pages per iteration, and QK as a
float MMA on the codes (drops the q̃ INT8 step and the k_sums term; papers.md §1.10).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from stageserve.kvcodec.paged import PagedCodeStore, check_decode_inputs
from stageserve_kernels._common import (
    check_float,
    check_int,
    check_same_device,
    combine,
    dense_rows,
    group_block,
    new_state,
    plan_splits,
    store_state,
)


@triton.jit
def unpack_tile(base, offs_n, offs_d, D: tl.constexpr, BITS: tl.constexpr):
    """[Π, D] codes (as float16) from rows of D·BITS/8 packed bytes; channel i in bits BITS·(i mod 8/BITS)."""
    PER: tl.constexpr = 8 // BITS
    byte = tl.load(base + offs_n[:, None] * (D // PER) + (offs_d // PER)[None, :]).to(tl.int32)
    return ((byte >> ((offs_d % PER) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float16)


@triton.jit
def _int8_codes(x, lo, hi):
    """x ≈ s·x′ + lo with x′ = round((x − lo)/s) ∈ [0, 255]; returns (x′ as float16, s)."""
    s = tl.where(hi > lo, (hi - lo) / 255.0, 1.0)
    c = tl.floor((x - lo[:, None]) / s[:, None] + 0.5)
    return tl.minimum(tl.maximum(c, 0.0), 255.0).to(tl.float16), s


@triton.jit
def _hack_decode_kernel(
    q_ptr, table_ptr, npages_ptr,
    kc_ptr, ks_ptr, km_ptr, ksum_ptr, vc_ptr, vs_ptr, vm_ptr, vsum_ptr,
    sk_ptr, sv_ptr, slen_ptr, ok_ptr, ov_ptr, olen_ptr,
    m_ptr, l_ptr, acc_ptr,
    scale, n_splits, pages_per_split, stride_tb,
    s_sk_b, s_sk_n, s_sk_h, s_ok_b, s_ok_n, s_ok_h,
    H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, PI: tl.constexpr,
    VCH: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    NCH: tl.constexpr = D // VCH
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    h = pid % H
    offs_g = tl.arange(0, BG)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, PI)
    gm = offs_g < G
    row0 = b * H * G + h * G
    q = tl.load(q_ptr + (row0 + offs_g)[:, None] * D + offs_d[None, :], mask=gm[:, None], other=0.0)
    q = q.to(tl.float32) * scale
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    total = n_splits + 1
    if split == n_splits:  # the BF16 rows: sinks, then the open block
        off = b * s_sk_b + h * s_sk_h
        m_i, l_i, acc = dense_rows(q, sk_ptr + off, sv_ptr + off, tl.load(slen_ptr + b), s_sk_n,
                                   m_i, l_i, acc, offs_d, BLOCK_R)  # fmt: skip
        off = b * s_ok_b + h * s_ok_h
        m_i, l_i, acc = dense_rows(q, ok_ptr + off, ov_ptr + off, tl.load(olen_ptr + b), s_ok_n,
                                   m_i, l_i, acc, offs_d, BLOCK_R)  # fmt: skip
    else:
        cid = offs_d // VCH
        first = split * pages_per_split
        last = tl.minimum(first + pages_per_split, tl.load(npages_ptr + b))
        for j in range(first, last):
            page = tl.load(table_ptr + b * stride_tb + j).to(tl.int64)
            ph = page * H + h  # [page, head] index of every field
            k_codes = unpack_tile(kc_ptr + ph * (PI * D * BK // 8), offs_n, offs_d, D, BK)
            v_codes = unpack_tile(vc_ptr + ph * (PI * D * BV // 8), offs_n, offs_d, D, BV)
            k_scale = tl.load(ks_ptr + ph * D + offs_d).to(tl.float32)
            k_min = tl.load(km_ptr + ph * D + offs_d).to(tl.float32)
            q_t = q * k_scale[None, :]  # scale folding
            s = tl.zeros([BG, PI], tl.float32) + tl.sum(q * k_min[None, :], 1)[:, None]  # β = q·k_min
            for c in tl.static_range(NCH):
                inch = (cid == c)[None, :]
                lo = tl.min(tl.where(inch, q_t, float("inf")), 1)
                hi = tl.max(tl.where(inch, q_t, float("-inf")), 1)
                q_codes, s_q = _int8_codes(q_t, lo, hi)
                q_codes = tl.where(inch, q_codes, 0.0)
                dots = tl.dot(q_codes, tl.trans(k_codes))  # integer products, exact in fp32
                k_sums = tl.load(ksum_ptr + (ph * PI + offs_n) * NCH + c).to(tl.float32)
                s += s_q[:, None] * dots + lo[:, None] * k_sums[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v_sums = tl.load(vsum_ptr + ph * D + offs_d).to(tl.float32)
            for c in tl.static_range(NCH):
                inch = (cid == c)[None, :]
                v_scale = tl.load(vs_ptr + (ph * PI + offs_n) * NCH + c).to(tl.float32)
                v_min = tl.load(vm_ptr + (ph * PI + offs_n) * NCH + c).to(tl.float32)
                p_t = p * v_scale[None, :]
                lo = tl.min(p_t, 1)
                p_codes, s_p = _int8_codes(p_t, lo, tl.max(p_t, 1))
                dots = tl.dot(p_codes, v_codes)  # [BG, D]; only chunk c's columns are kept
                part = s_p[:, None] * dots + lo[:, None] * v_sums[None, :] + tl.sum(p * v_min[None, :], 1)[:, None]
                acc += tl.where(inch, part, 0.0)
            m_i = m_new
    store_state(m_ptr, l_ptr, acc_ptr, row0, total, split, m_i, l_i, acc, offs_g, offs_d, G, D)


def check_store_inputs(
    q: torch.Tensor,
    store: PagedCodeStore,
    layer: int,
    page_tables: torch.Tensor,
    num_pages: torch.Tensor,
    dense: tuple[torch.Tensor, ...],
) -> None:
    """Launcher checks shared by the code-page kernels; ValueError names the argument."""
    if not isinstance(store, PagedCodeStore):
        raise ValueError(f"store: expected a PagedCodeStore, got {type(store).__name__}")
    if not 0 <= layer < store.num_layers:
        raise ValueError(f"layer: {layer} not in [0, {store.num_layers})")
    sinks_k, sinks_v, sink_lens, open_k, open_v, open_lens = dense
    check_float(q=q, sinks_k=sinks_k, sinks_v=sinks_v, open_k=open_k, open_v=open_v)
    check_int(page_tables=page_tables, num_pages=num_pages, sink_lens=sink_lens, open_lens=open_lens)
    check_same_device(
        q.device, store=store.fields["k_codes"], page_tables=page_tables, num_pages=num_pages,
        sinks_k=sinks_k, sinks_v=sinks_v, sink_lens=sink_lens, open_k=open_k, open_v=open_v, open_lens=open_lens,
    )  # fmt: skip
    check_decode_inputs(q, store.fmt, page_tables, num_pages, dense)
    d = store.fmt.head_dim
    if d & (d - 1):
        raise ValueError(f"q: head_dim {d} must be a power of two for the Triton kernels")


def launch_code_kernel(kernel, q, store, layer, page_tables, num_pages, dense, scale, pages_per_split, block_r=16):
    """Shared launcher of the code-page kernels (hack, fused dequant): returns [B, Hq, d] float32."""
    check_store_inputs(q, store, layer, page_tables, num_pages, dense)
    fmt = store.fmt
    b, hq, d = q.shape
    h = fmt.num_kv_heads
    sinks_k, sinks_v, sink_lens, open_k, open_v, open_lens = dense
    max_pages = int(num_pages.max()) if b else 0
    pps, splits = plan_splits(b, h, max_pages, pages_per_split)
    m, l, acc = new_state(b, hq, splits + 1, d, q.device)  # noqa: E741
    f = {name: t[layer] for name, t in store.fields.items()}
    sinks_k, sinks_v, open_k, open_v = (t.contiguous() for t in (sinks_k, sinks_v, open_k, open_v))
    kernel[(b * h, splits + 1)](
        q.contiguous(), page_tables, num_pages,
        f["k_codes"], f["k_scale"], f["k_min"], f["k_sums"], f["v_codes"], f["v_scale"], f["v_min"], f["v_sums"],
        sinks_k, sinks_v, sink_lens, open_k, open_v, open_lens,
        m, l, acc,
        1.0 / math.sqrt(d) if scale is None else scale, splits, pps, page_tables.stride(0),
        sinks_k.stride(0), sinks_k.stride(1), sinks_k.stride(2), open_k.stride(0), open_k.stride(1), open_k.stride(2),
        H=h, G=hq // h, BG=group_block(hq // h), D=d, PI=fmt.page_size, VCH=fmt.v_chunk,
        BK=fmt.bits_k, BV=fmt.bits_v, BLOCK_R=block_r,
    )  # fmt: skip
    return combine(m, l, acc)


def hack_decode_attention(
    q: torch.Tensor,
    store: PagedCodeStore,
    layer: int,
    page_tables: torch.Tensor,
    num_pages: torch.Tensor,
    sinks_k: torch.Tensor,
    sinks_v: torch.Tensor,
    sink_lens: torch.Tensor,
    open_k: torch.Tensor,
    open_v: torch.Tensor,
    open_lens: torch.Tensor,
    scale: float | None = None,
    pages_per_split: int | None = None,
) -> torch.Tensor:
    """Triton twin of ``kvcodec.paged.paged_decode_attention_torch`` (same arguments): [B, Hq, d] float32."""
    dense = (sinks_k, sinks_v, sink_lens, open_k, open_v, open_lens)
    return launch_code_kernel(_hack_decode_kernel, q, store, layer, page_tables, num_pages, dense, scale,
                              pages_per_split)  # fmt: skip
