"""Pieces shared by the decode kernels: split planning, the dense-rows online softmax, the log-sum-exp combine.

Split-K (FlashDecoding): each program of a decode kernel owns one (sequence, KV head, split) and writes
that split's softmax state for the G query heads of the group: m (max score), l (Σ exp(s − m)) and
acc (Σ exp(s − m)·v), into buffers [B, Hq, splits] and [B, Hq, splits, d]. ``_combine_kernel`` merges the
splits of one (sequence, query head): M = max m, out = Σ e^(m−M)·acc / Σ e^(m−M)·l.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 264  # ~2 waves on an H100 (132 SMs)
MAX_SPLITS = 128


def plan_splits(batch: int, kv_heads: int, max_pages: int, pages_per_split: int | None) -> tuple[int, int]:
    """(pages_per_split, number of page splits) so that batch·kv_heads·splits fills the GPU about twice."""
    if max_pages == 0:
        return 1, 0
    if pages_per_split is None:
        want = max(1, min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, batch * kv_heads)))
        pages_per_split = triton.cdiv(max_pages, want)
    if pages_per_split < 1:
        raise ValueError(f"pages_per_split: must be >= 1, got {pages_per_split}")
    return pages_per_split, triton.cdiv(max_pages, pages_per_split)


def check_same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name}: on {t.device}, expected {device} (the device of q)")


def check_float(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: dtype {t.dtype}, expected float32/float16/bfloat16")


def check_int(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: dtype {t.dtype}, expected int32/int64")


@triton.jit
def dense_rows(q, k_base, v_base, n, stride_n, m_i, l_i, acc, offs_d, BLOCK_R: tl.constexpr):
    """Online softmax over ``n`` dense rows (row r of K at k_base + r·stride_n); q [BG, D] is pre-scaled."""
    for start in range(0, n, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rm = rows < n
        ptr = rows[:, None] * stride_n + offs_d[None, :]
        k = tl.load(k_base + ptr, mask=rm[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_base + ptr, mask=rm[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = tl.where(rm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def store_state(
    m_ptr, l_ptr, acc_ptr, row0, n_splits, split, m_i, l_i, acc, offs_g, offs_d, G: tl.constexpr, D: tl.constexpr
):
    """Write one split's state for query heads row0 .. row0+G-1 (buffers [B·Hq, splits(, D)])."""
    gm = offs_g < G
    rows = row0 + offs_g
    tl.store(m_ptr + rows * n_splits + split, m_i, mask=gm)
    tl.store(l_ptr + rows * n_splits + split, l_i, mask=gm)
    tl.store(acc_ptr + (rows[:, None] * n_splits + split) * D + offs_d[None, :], acc, mask=gm[:, None])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, n_splits, D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # b·Hq + query head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    sm = offs_s < n_splits
    m = tl.load(m_ptr + row * n_splits + offs_s, mask=sm, other=float("-inf"))
    l = tl.load(l_ptr + row * n_splits + offs_s, mask=sm, other=0.0)  # noqa: E741
    top = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
    acc = tl.load(acc_ptr + (row * n_splits + offs_s[:, None]) * D + offs_d[None, :], mask=sm[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + row * D + offs_d, out)


def new_state(batch: int, q_heads: int, splits: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    m = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=device)
    return m, torch.empty_like(m), torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=device)


def combine(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Merge split states [B, Hq, S(, D)] -> [B, Hq, D] float32."""
    b, hq, splits, d = acc.shape
    out = torch.empty(b, hq, d, dtype=torch.float32, device=acc.device)
    _combine_kernel[(b * hq,)](m, l, acc, out, splits, D=d, BLOCK_S=max(16, triton.next_power_of_2(splits)))
    return out


def dot_dtype() -> tl.dtype:
    """BF16 for ``tl.dot`` operands, FP32 under TRITON_INTERPRET (the 3.9 interpreter's BF16 dot is broken)."""
    return tl.float32 if triton.knobs.runtime.interpret else tl.bfloat16


def group_block(group: int) -> int:
    """Rows of the query tile: the G query heads of a KV group, padded to tl.dot's minimum of 16."""
    return max(16, triton.next_power_of_2(group))
