"""BF16 paged decode attention (Triton baseline): FlashDecoding-style split-K over pages of Π tokens.

Pages: k_pages, v_pages [num_pages, Hkv, Π, d] bf16 (page-major, then head, then token), ``page_tables``
[B, max_pages] and ``seq_lens`` [B] (tokens; the last page may be partial). Grid (B·Hkv, splits); each
program runs one online softmax over its pages for the G query heads of its KV head (BF16 MMAs, FP32
accumulation; under TRITON_INTERPRET the operands are widened to FP32 after BF16 rounding, because the
Triton 3.9 interpreter returns garbage for BF16 ``tl.dot``); ``_common.combine`` merges the splits.

Cost per decode step and KV head (T tokens): bytes = 4·T·d (K and V in BF16; the roofline input),
FLOPs = 4·G·T·d.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from stageserve_kernels._common import (
    check_int,
    check_same_device,
    combine,
    dot_dtype,
    group_block,
    new_state,
    plan_splits,
    store_state,
)


@triton.jit
def _bf16_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, m_ptr, l_ptr, acc_ptr,
    scale, n_splits, pages_per_split, stride_tb,
    H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, PI: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
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
    q = (q.to(tl.float32) * scale).to(tl.bfloat16).to(DOT_DTYPE)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    seq_len = tl.load(len_ptr + b)
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, tl.cdiv(seq_len, PI))
    for j in range(first, last):
        page = tl.load(table_ptr + b * stride_tb + j).to(tl.int64)
        tile = (page * H + h) * (PI * D) + offs_n[:, None] * D + offs_d[None, :]
        valid = j * PI + offs_n < seq_len
        k = tl.load(k_ptr + tile, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + tile, mask=valid[:, None], other=0.0)
        s = tl.where(valid[None, :], tl.dot(q, tl.trans(k.to(DOT_DTYPE))), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16).to(DOT_DTYPE), v.to(DOT_DTYPE))
        m_i = m_new
    store_state(m_ptr, l_ptr, acc_ptr, row0, n_splits, split, m_i, l_i, acc, offs_g, offs_d, G, D)


def bf16_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    pages_per_split: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, d]; k_pages, v_pages [N, Hkv, Π, d] bf16; page_tables [B, P]; seq_lens [B] -> [B, Hq, d] f32."""
    if q.dim() != 3:
        raise ValueError(f"q: expected [B, Hq, d], got {tuple(q.shape)}")
    b, hq, d = q.shape
    if k_pages.dim() != 4 or k_pages.shape[3] != d or k_pages.dtype != torch.bfloat16:
        raise ValueError(f"k_pages: expected [N, Hkv, Π, {d}] bfloat16, got {tuple(k_pages.shape)} {k_pages.dtype}")
    if v_pages.shape != k_pages.shape or v_pages.dtype != torch.bfloat16:
        raise ValueError(f"v_pages: expected {tuple(k_pages.shape)} bfloat16, got {tuple(v_pages.shape)}")
    _, h, page, _ = k_pages.shape
    if hq % h or d & (d - 1) or page & (page - 1):
        raise ValueError(f"q: {hq} query heads over {h} KV heads, head_dim {d}, page {page}: need G·Hkv, powers of 2")
    check_int(page_tables=page_tables, seq_lens=seq_lens)
    check_same_device(q.device, k_pages=k_pages, v_pages=v_pages, page_tables=page_tables, seq_lens=seq_lens)
    if page_tables.dim() != 2 or page_tables.shape[0] != b:
        raise ValueError(f"page_tables: expected [{b}, max_pages], got {tuple(page_tables.shape)}")
    if seq_lens.shape != (b,) or (seq_lens < 1).any() or (seq_lens > page_tables.shape[1] * page).any():
        raise ValueError(f"seq_lens: expected [{b}] with 1 <= n <= {page_tables.shape[1] * page}")
    pps, splits = plan_splits(b, h, triton.cdiv(int(seq_lens.max()), page), pages_per_split)
    m, l, acc = new_state(b, hq, splits, d, q.device)  # noqa: E741
    _bf16_decode_kernel[(b * h, splits)](
        q.contiguous(), k_pages.contiguous(), v_pages.contiguous(), page_tables, seq_lens, m, l, acc,
        1.0 / math.sqrt(d) if scale is None else scale, splits, pps, page_tables.stride(0),
        H=h, G=hq // h, BG=group_block(hq // h), D=d, PI=page, DOT_DTYPE=dot_dtype(),
    )  # fmt: skip
    return combine(m, l, acc)


def bf16_decode_attention_torch(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_tables: torch.Tensor, seq_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Torch reference of ``bf16_decode_attention``: gather the pages, mask past ``seq_lens``, SDPA in float32."""
    b, hq, d = q.shape
    n, h, page, _ = k_pages.shape
    k = k_pages[page_tables].permute(0, 2, 1, 3, 4).reshape(b, h, -1, d).float()  # [B, H, P·Π, d]
    v = v_pages[page_tables].permute(0, 2, 1, 3, 4).reshape(b, h, -1, d).float()
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.squeeze(2)
