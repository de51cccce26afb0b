"""HACK page quantization and attention on codes in plain torch: the oracle the kernels are tested against.

Quantizer (papers.md HACK §1.2): for a group x, m = min x, M = max x, L = 2^b - 1, s = (M - m)/L (1 if M == m);
s and m are rounded to BF16 *before* the codes are computed, so every implementation agrees exactly;
code = clamp(round((x - m)/s), 0, L). K is grouped per channel over the page's tokens, V per token over
channel chunks of ``v_chunk``. Code sums are cached: k_sums[n, g] = sum of K codes of token n in chunk g,
v_sums[c] = sum of V codes of channel c over the page.

Attention on codes (§1.4): scores and the PV product are computed from integer code products plus
corrections from the cached sums and the mins; q (scaled by the K channel scales) and p (scaled by the V
token scales) are quantized to INT8 per chunk first, as the kernels do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class QuantPage:
    """One KV head's quantized K and V over ``rows`` tokens (codes unpacked, one integer per element)."""

    k_codes: torch.Tensor  # [rows, d] uint8 codes in [0, 2^bk - 1]
    k_scale: torch.Tensor  # [d] bf16
    k_min: torch.Tensor  # [d] bf16
    k_sums: torch.Tensor  # [rows, g] int32
    v_codes: torch.Tensor  # [rows, d]
    v_scale: torch.Tensor  # [rows, g] bf16
    v_min: torch.Tensor  # [rows, g] bf16
    v_sums: torch.Tensor  # [d] int32
    v_chunk: int


def _quantize(x: torch.Tensor, dim: int, bits: int, stochastic: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """Asymmetric min/scale quantization of x along ``dim``; returns codes, scale, min (scale/min BF16)."""
    top = (1 << bits) - 1
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = torch.where(hi > lo, (hi - lo) / top, torch.ones_like(hi)).to(torch.bfloat16)
    low = lo.to(torch.bfloat16)
    scaled = (x - low.float()) / scale.float()
    if stochastic is not None:
        scaled = torch.floor(scaled + torch.rand(scaled.shape, generator=stochastic))
    else:
        scaled = torch.round(scaled)
    codes = scaled.clamp(0, top).to(torch.uint8)
    return codes, scale.squeeze(dim), low.squeeze(dim)


def quantize_page(
    k: torch.Tensor, v: torch.Tensor, bits_k: int, bits_v: int, v_chunk: int, stochastic: torch.Generator | None = None
) -> QuantPage:
    """k, v [rows, d] (one KV head, float) -> QuantPage."""
    rows, d = k.shape
    k_codes, k_scale, k_min = _quantize(k.float(), 0, bits_k, stochastic)
    g = d // v_chunk
    v_codes, v_scale, v_min = _quantize(v.float().reshape(rows, g, v_chunk), 2, bits_v, stochastic)
    v_codes = v_codes.reshape(rows, d)
    k_sums = k_codes.to(torch.int32).reshape(rows, g, v_chunk).sum(-1)
    v_sums = v_codes.to(torch.int32).sum(0)
    return QuantPage(k_codes, k_scale, k_min, k_sums, v_codes, v_scale, v_min, v_sums, v_chunk)


def dequantize_page(page: QuantPage) -> tuple[torch.Tensor, torch.Tensor]:
    """QuantPage -> k, v [rows, d] float32."""
    rows, d = page.k_codes.shape
    k = page.k_codes.float() * page.k_scale.float() + page.k_min.float()
    g = d // page.v_chunk
    v = page.v_codes.float().reshape(rows, g, page.v_chunk) * page.v_scale.float().unsqueeze(-1)
    v = v + page.v_min.float().unsqueeze(-1)
    return k, v.reshape(rows, d)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, d] codes -> [rows, d * bits / 8] bytes; channel c sits in bits b*(c mod 8/b) of byte c // (8/b)."""
    per = 8 // bits
    rows, d = codes.shape
    grouped = codes.to(torch.int32).reshape(rows, d // per, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def _int8_quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 8-bit quantization along ``dim``: x ~= s * x' + m with x' in [0, 255]."""
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    return torch.round((x - lo) / scale).clamp(0, 255), scale, lo


def scores_on_codes(q: torch.Tensor, page: QuantPage, int8: bool = True) -> torch.Tensor:
    """q [G, d] (query heads sharing this KV head, post-RoPE) -> scaled scores [G, rows] = q·kᵀ/√d,
    computed from K codes, cached k_sums and the K mins (§1.4 QK path)."""
    g_count = q.shape[1] // page.v_chunk
    q_scaled = q.float() * page.k_scale.float() / math.sqrt(q.shape[1])  # scale folding (+ 1/√d)
    beta = (q.float() * page.k_min.float()).sum(-1, keepdim=True) / math.sqrt(q.shape[1])
    codes = page.k_codes.float()
    if not int8:
        return q_scaled @ codes.T + beta
    chunks = q_scaled.reshape(q.shape[0], g_count, page.v_chunk)
    q_codes, s_q, m_q = _int8_quantize(chunks, dim=2)  # per query head and channel chunk
    k_chunks = codes.reshape(codes.shape[0], g_count, page.v_chunk)
    dots = torch.einsum("hgc,ngc->hng", q_codes, k_chunks)  # integer products
    out = (s_q.squeeze(-1).unsqueeze(1) * dots).sum(-1) + (m_q.squeeze(-1).unsqueeze(1) * page.k_sums.float()).sum(-1)
    return out + beta


def values_on_codes(p: torch.Tensor, page: QuantPage, int8: bool = True) -> torch.Tensor:
    """p [G, rows] softmax weights -> p·V [G, d] from V codes, cached v_sums and the V mins (§1.4 PV path)."""
    rows, d = page.v_codes.shape
    g_count = d // page.v_chunk
    p_scaled = p.float().unsqueeze(-1) * page.v_scale.float().unsqueeze(0)  # [G, rows, g]
    codes = page.v_codes.float().reshape(rows, g_count, page.v_chunk)
    mins = (p.float().unsqueeze(-1) * page.v_min.float().unsqueeze(0)).sum(1)  # [G, g]
    if not int8:
        out = torch.einsum("hng,ngc->hgc", p_scaled, codes)
    else:
        p_codes, s_p, m_p = _int8_quantize(p_scaled, dim=1)  # per query head and chunk, over the page's tokens
        dots = torch.einsum("hng,ngc->hgc", p_codes, codes)
        sums = page.v_sums.float().reshape(g_count, page.v_chunk)
        out = s_p.transpose(1, 2) * dots + m_p.transpose(1, 2) * sums.unsqueeze(0)
    return (out + mins.unsqueeze(-1)).reshape(p.shape[0], d)


def decode_attention(
    q: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    pages: list[QuantPage],
    open_k: torch.Tensor,
    open_v: torch.Tensor,
    int8: bool = True,
) -> torch.Tensor:
    """One decode step for one KV head: q [G, d] over BF16 sinks, closed quantized pages and the BF16 open
    block, merged by one online softmax (§1.5). Returns [G, d] float32."""
    scale = 1.0 / math.sqrt(q.shape[1])
    mx = torch.full((q.shape[0], 1), float("-inf"))
    den = torch.zeros(q.shape[0], 1)
    acc = torch.zeros(q.shape[0], q.shape[1])
    segments: list[tuple[str, object]] = [("dense", (sink_k, sink_v))]
    segments += [("codes", page) for page in pages]
    segments.append(("dense", (open_k, open_v)))
    for kind, seg in segments:
        if kind == "dense":
            k, v = seg  # type: ignore[misc]
            if k.shape[0] == 0:
                continue
            s = q.float() @ k.float().T * scale
        else:
            s = scores_on_codes(q, seg, int8)  # type: ignore[arg-type]
        mx2 = torch.maximum(mx, s.amax(-1, keepdim=True))
        r, p = torch.exp(mx - mx2), torch.exp(s - mx2)
        part = p @ v.float() if kind == "dense" else values_on_codes(p, seg, int8)  # type: ignore[arg-type]
        den, acc, mx = den * r + p.sum(-1, keepdim=True), acc * r + part, mx2
    return acc / den


def roundtrip_page(
    k: torch.Tensor, v: torch.Tensor, fmt_name: str, bits: tuple[int, int], v_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a page of ``fmt_name`` stores, as values: k, v [..., rows, d] -> quantized then dequantized
    (batched over leading dims, e.g. KV heads). bf16 rounds; fp8 uses one scale per head per tensor."""
    if fmt_name == "bf16" or bits == (16, 16):
        return k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
    if fmt_name == "fp8":
        return _fp8_roundtrip(k), _fp8_roundtrip(v)
    *lead, rows, d = k.shape
    kc, ks, km = _quantize(k.float(), -2, bits[0], None)
    k_hat = kc.float() * ks.float().unsqueeze(-2) + km.float().unsqueeze(-2)
    dv = v.shape[-1]  # V may be narrower than K (ZeroC ranks)
    g = dv // v_chunk
    vc, vs, vm = _quantize(v.float().reshape(*lead, rows, g, v_chunk), -1, bits[1], None)
    v_hat = vc.float() * vs.float().unsqueeze(-1) + vm.float().unsqueeze(-1)
    return k_hat, v_hat.reshape(*lead, rows, dv)


def _fp8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=(-2, -1), keepdim=True).float()
    scale = (amax / 448.0).clamp(min=1e-12).to(torch.bfloat16).float()
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale
