"""The HACK torch oracle: quantizer invariants, code packing, and attention on codes vs dequantize-then-attend.

Tolerances: with float q̃ and p̃ the identity is exact, so only float32 rounding remains (1e-5). The INT8
quantization of q̃ and p̃ adds about 1 % relative error on random data (papers.md HACK §1.4 measured
~1.6 % at d = 128); we allow 4 %.
"""

from __future__ import annotations

import math

import pytest
import torch

from stageserve.kvcodec.reference import (
    decode_attention,
    dequantize_page,
    pack_codes,
    quantize_page,
    scores_on_codes,
    unpack_codes,
    values_on_codes,
)


def _page(rows=64, d=64, bits=(2, 2), chunk=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(rows, d, generator=g) * 2, torch.randn(rows, d, generator=g)
    return k, v, quantize_page(k, v, bits[0], bits[1], chunk)


@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (4, 2)])
def test_quantizer_codes_sums_and_error_bound(bits):
    k, v, page = _page(bits=bits, chunk=32)
    assert int(page.k_codes.max()) <= (1 << bits[0]) - 1 and int(page.v_codes.max()) <= (1 << bits[1]) - 1
    assert torch.equal(page.k_sums, page.k_codes.int().reshape(64, 2, 32).sum(-1))
    assert torch.equal(page.v_sums, page.v_codes.int().sum(0))
    k_hat, v_hat = dequantize_page(page)
    k_step = (k.amax(0) - k.amin(0)) / ((1 << bits[0]) - 1)
    assert ((k_hat - k).abs() <= k_step / 2 * 1.02 + 1e-2).all()  # half a step, plus BF16 scale/min rounding
    assert page.k_scale.dtype == torch.bfloat16 and page.v_min.dtype == torch.bfloat16


def test_constant_group_gets_scale_one_and_is_exact():
    k = torch.full((64, 8), 0.5)
    page = quantize_page(k, k.clone(), 2, 2, 8)
    assert torch.all(page.k_scale.float() == 1.0)
    assert torch.equal(dequantize_page(page)[0], k)


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.linspace(0, 3, 64).repeat(64, 1)  # K channel groups over 64 tokens
    means = []
    for seed in range(40):
        page = quantize_page(x, x, 2, 2, 64, stochastic=torch.Generator().manual_seed(seed))
        means.append(dequantize_page(page)[1].mean())
    assert abs(torch.stack(means).mean() - x.mean()) < 0.02
    a = quantize_page(x, x, 2, 2, 64, stochastic=torch.Generator().manual_seed(1))
    b = quantize_page(x, x, 2, 2, 64, stochastic=torch.Generator().manual_seed(1))
    assert torch.equal(a.v_codes, b.v_codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_layout_is_little_end_first(bits):
    codes = torch.randint(0, 1 << bits, (5, 16), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 16 * bits // 8)
    per = 8 // bits
    assert int(packed[0, 0]) == sum(int(codes[0, c]) << (bits * c) for c in range(per))
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("chunk", [64, 32, 16])
def test_scores_and_values_on_codes_equal_dequantized_math(chunk):
    k, v, page = _page(chunk=chunk)
    q = torch.randn(3, 64)  # a GQA group of 3 query heads
    k_hat, v_hat = dequantize_page(page)
    ref = q @ k_hat.T / math.sqrt(64)
    assert torch.allclose(scores_on_codes(q, page, int8=False), ref, atol=1e-5)
    rel = (scores_on_codes(q, page) - ref).abs().max() / ref.abs().max()
    assert rel < 0.04
    p = torch.softmax(ref, -1)
    assert torch.allclose(values_on_codes(p, page, int8=False), p @ v_hat, atol=1e-5)
    out_ref = p @ v_hat
    assert (values_on_codes(p, page) - out_ref).abs().max() / out_ref.abs().max() < 0.04


@pytest.mark.parametrize("open_len", [0, 1, 37])
@pytest.mark.parametrize("num_pages", [1, 3])
def test_decode_attention_online_softmax_matches_dense(open_len, num_pages):
    torch.manual_seed(num_pages * 100 + open_len)
    d = 64
    sink_k, sink_v = torch.randn(4, d), torch.randn(4, d)
    raw = [(torch.randn(64, d), torch.randn(64, d)) for _ in range(num_pages)]
    pages = [quantize_page(k, v, 2, 2, 64) for k, v in raw]
    open_k, open_v = torch.randn(open_len, d), torch.randn(open_len, d)
    q = torch.randn(3, d)
    deq = [dequantize_page(p) for p in pages]
    keys = torch.cat([sink_k, *[k for k, _ in deq], open_k])
    values = torch.cat([sink_v, *[v for _, v in deq], open_v])
    dense = torch.softmax(q @ keys.T / math.sqrt(d), -1) @ values
    exact = decode_attention(q, sink_k, sink_v, pages, open_k, open_v, int8=False)
    assert torch.allclose(exact, dense, atol=1e-5)
    approx = decode_attention(q, sink_k, sink_v, pages, open_k, open_v)
    assert (approx - dense).abs().max() / dense.abs().max() < 0.04
