"""Fused-dequant paged decode attention (the kivi2-style baseline, Triton): same pages, same bytes as HACK.

Each page's codes are unpacked and dequantized to FP16 inside the kernel (k̂ = k′·k_scale + k_min per
channel, v̂ = v′·v_scale + v_min per token and chunk), then ordinary FP16 attention with FP32 accumulation:
score = q·k̂ᵀ/√d, acc += p·v̂. Grid, splits, the BF16-rows program and the combine are those of
``hack_decode``; only the per-page math differs, so the pair isolates the value of computing on codes.

Cost per decode step and KV head: the same bytes as ``hack_decode`` (``PageFormat.layer_page_bytes``/Π per
token); FLOPs ≈ 4·G·T·d for the two dots plus 4·T·d for dequantization.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stageserve.kvcodec.paged import PagedCodeStore
from stageserve_kernels._common import dense_rows, store_state
from stageserve_kernels.hack_decode import launch_code_kernel, unpack_tile


@triton.jit
def _dequant_decode_kernel(
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
    if split == n_splits:
        off = b * s_sk_b + h * s_sk_h
        m_i, l_i, acc = dense_rows(q, sk_ptr + off, sv_ptr + off, tl.load(slen_ptr + b), s_sk_n,
                                   m_i, l_i, acc, offs_d, BLOCK_R)  # fmt: skip
        off = b * s_ok_b + h * s_ok_h
        m_i, l_i, acc = dense_rows(q, ok_ptr + off, ov_ptr + off, tl.load(olen_ptr + b), s_ok_n,
                                   m_i, l_i, acc, offs_d, BLOCK_R)  # fmt: skip
    else:
        cid = offs_d // VCH
        q16 = q.to(tl.float16)
        first = split * pages_per_split
        last = tl.minimum(first + pages_per_split, tl.load(npages_ptr + b))
        for j in range(first, last):
            page = tl.load(table_ptr + b * stride_tb + j).to(tl.int64)
            ph = page * H + h
            k_scale = tl.load(ks_ptr + ph * D + offs_d).to(tl.float32)
            k_min = tl.load(km_ptr + ph * D + offs_d).to(tl.float32)
            k = unpack_tile(kc_ptr + ph * (PI * D * BK // 8), offs_n, offs_d, D, BK).to(tl.float32)
            k = (k * k_scale[None, :] + k_min[None, :]).to(tl.float16)
            meta = (ph * PI + offs_n)[:, None] * NCH + cid[None, :]  # [Π, D] -> (token, chunk of the channel)
            v = unpack_tile(vc_ptr + ph * (PI * D * BV // 8), offs_n, offs_d, D, BV).to(tl.float32)
            v = v * tl.load(vs_ptr + meta).to(tl.float32) + tl.load(vm_ptr + meta).to(tl.float32)
            s = tl.dot(q16, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
            m_i = m_new
    store_state(m_ptr, l_ptr, acc_ptr, row0, n_splits + 1, split, m_i, l_i, acc, offs_g, offs_d, G, D)


def dequant_decode_attention(
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
    """Triton twin of ``kvcodec.paged.dequant_decode_attention_torch`` (same arguments): [B, Hq, d] float32."""
    dense = (sinks_k, sinks_v, sink_lens, open_k, open_v, open_lens)
    return launch_code_kernel(_dequant_decode_kernel, q, store, layer, page_tables, num_pages, dense, scale,
                              pages_per_split)  # fmt: skip


__all__ = ["dequant_decode_attention"]
