"""The paged code store and the vectorized torch decode path, against the per-head oracle in ``reference``.

Tolerances:
* vs ``reference.decode_attention`` (same INT8 q̃/p̃ quantization, same page splits): the two differ only in
  float32 summation order (einsum vs matmul; p relative to the page max vs the running max, which the
  affine INT8 quantizer absorbs), so most outputs agree to ~1e-6 and we require 90 % within 1e-5. Order
  differences can flip an INT8 rounding that sits at a .5 boundary; one flipped p̃ code moves an output by
  one INT8 step of p̃ times a V code, s_p·v′/l ≤ (v_scale/255)·(2^bv−1) ≈ 0.02 for 4-bit V on this data
  (observed up to 3e-3), so the maximum is allowed 1e-2. A wrong INT8 grouping
  (chunk, axis) gives errors of the INT8 size (~1e-2) on most elements and fails the 90 % check.
* vs dequantize-then-attend with float q̃/p̃ (``int8=False``): the §1.4 identity is exact, only float32
  rounding remains: 1e-5.
* vs dequantize-then-attend with INT8 q̃/p̃: each element of q̃ (per chunk of p channels) and p̃ (per chunk
  over the page's Π tokens) is off by at most half an INT8 step, range/510. Those rounding errors are
  independent, so their sum grows like √(terms): the p̃ error of a page grows like √Π. The data here is
  deliberately harsh (K ×2 with per-channel offsets, so scores are peaked): measured 1–2 % relative error
  (output norm) at Π=32, 2–4 % at Π=64, 3–8 % at Π=128 (papers.md §1.4: 1.6 % at Π=64, d=128 on plain
  random data). We allow 10 %·√(Π/128), i.e. 5 %, 7 %, 10 %.
"""

from __future__ import annotations

import math

import pytest
import torch

from stageserve.kvcodec.format import PageFormat
from stageserve.kvcodec.paged import (
    FIELDS,
    PagedCodeStore,
    dense_decode_attention_torch,
    dequant_decode_attention_torch,
    paged_decode_attention_torch,
    quantize_pages,
)
from stageserve.kvcodec.reference import decode_attention, dequantize_page, quantize_page
from stageserve.kvcodec.wire import Span, pack

FORMATS = ["hack2", "hack4", "hack-k4v2"]


def _case(fmt: PageFormat, batch: int, pages: list[int], open_lens: list[int], group: int, seed: int = 0):
    """A store with random pages for ``batch`` sequences (scattered physical ids) plus dense sinks/open rows."""
    g = torch.Generator().manual_seed(seed)
    h, d, pi = fmt.num_kv_heads, fmt.head_dim, fmt.page_size
    total = sum(pages)
    store = PagedCodeStore.allocate(fmt, num_layers=2, num_pages=max(total * 2, 1))
    ids = torch.randperm(store.num_pages, generator=g)[:total]
    max_p = max(max(pages), 1)
    tables = torch.zeros(batch, max_p, dtype=torch.long)
    start = 0
    for b, n in enumerate(pages):
        if n:
            k = torch.randn(n, pi, h, d, generator=g) * 2 + torch.randn(1, 1, h, d, generator=g)  # outlier channels
            v = torch.randn(n, pi, h, d, generator=g)
            store.write_pages(1, ids[start : start + n], k, v)
            tables[b, :n] = ids[start : start + n]
        start += n
    s = fmt.num_sinks
    o = max(max(open_lens), 1)
    sinks_k = torch.randn(batch, s, h, d, generator=g).bfloat16()
    sinks_v = torch.randn(batch, s, h, d, generator=g).bfloat16()
    open_k = torch.randn(batch, o, h, d, generator=g).bfloat16()
    open_v = torch.randn(batch, o, h, d, generator=g).bfloat16()
    q = torch.randn(batch, h * group, d, generator=g)
    sl = torch.full((batch,), s)
    return dict(
        q=q,
        store=store,
        layer=1,
        page_tables=tables,
        num_pages=torch.tensor(pages),
        sinks_k=sinks_k,
        sinks_v=sinks_v,
        sink_lens=sl,
        open_k=open_k,
        open_v=open_v,
        open_lens=torch.tensor(open_lens),
    )


def _oracle(c: dict, int8: bool) -> torch.Tensor:
    """reference.decode_attention, one sequence and KV head at a time."""
    q, store = c["q"], c["store"]
    h = store.fmt.num_kv_heads
    grp = q.shape[1] // h
    out = torch.empty(q.shape)
    for b in range(q.shape[0]):
        per_page = [store.read_page(c["layer"], int(c["page_tables"][b, j])) for j in range(int(c["num_pages"][b]))]
        sl, ol = int(c["sink_lens"][b]), int(c["open_lens"][b])
        for kv in range(h):
            out[b, kv * grp : (kv + 1) * grp] = decode_attention(
                q[b, kv * grp : (kv + 1) * grp],
                c["sinks_k"][b, :sl, kv],
                c["sinks_v"][b, :sl, kv],
                [p[kv] for p in per_page],
                c["open_k"][b, :ol, kv],
                c["open_v"][b, :ol, kv],
                int8=int8,
            )
    return out


def _close_to_oracle(got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got - want).abs()
    assert (diff < 1e-5).float().mean() >= 0.9, (diff < 1e-5).float().mean()
    assert diff.max() < 1e-2, diff.max()


def _dequant_then_attend(c: dict) -> torch.Tensor:
    """Dequantize every page to float, concatenate with the BF16 rows, run plain float attention."""
    q, store = c["q"], c["store"]
    fmt = store.fmt
    rows_k, rows_v, lens = [], [], []
    for b in range(q.shape[0]):
        ks = [c["sinks_k"][b, : int(c["sink_lens"][b])].float(), c["open_k"][b, : int(c["open_lens"][b])].float()]
        vs = [c["sinks_v"][b, : int(c["sink_lens"][b])].float(), c["open_v"][b, : int(c["open_lens"][b])].float()]
        for j in range(int(c["num_pages"][b])):
            heads = [dequantize_page(p) for p in store.read_page(c["layer"], int(c["page_tables"][b, j]))]
            ks.append(torch.stack([kv[0] for kv in heads], 1))
            vs.append(torch.stack([kv[1] for kv in heads], 1))
        rows_k.append(torch.cat(ks))
        rows_v.append(torch.cat(vs))
        lens.append(rows_k[-1].shape[0])
    n = max(lens)
    k = torch.zeros(q.shape[0], n, fmt.num_kv_heads, fmt.head_dim)
    v = torch.zeros_like(k)
    for b in range(q.shape[0]):
        k[b, : lens[b]], v[b, : lens[b]] = rows_k[b], rows_v[b]
    return dense_decode_attention_torch(q, k, v, torch.tensor(lens))


@pytest.mark.parametrize("fmt_name", FORMATS + ["kivi2"])
@pytest.mark.parametrize("page_size", [32, 64, 128])
def test_quantize_pages_equals_quantize_page_bit_for_bit(fmt_name, page_size):
    fmt = PageFormat(fmt_name, 2, 64, page_size=page_size)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, page_size, 2, 64, generator=g), torch.randn(2, page_size, 2, 64, generator=g)
    store = PagedCodeStore.allocate(fmt, 1, 4)
    store.write_pages(0, [3, 0], k, v)
    for slot, page in ((3, 0), (0, 1)):
        for h, got in enumerate(store.read_page(0, slot)):
            want = quantize_page(k[page, :, h], v[page, :, h], fmt.bits_k, fmt.bits_v, fmt.v_chunk)
            for name in ("k_codes", "k_scale", "k_min", "k_sums", "v_codes", "v_scale", "v_min", "v_sums"):
                assert torch.equal(getattr(got, name), getattr(want, name).to(getattr(got, name).dtype)), name
    assert set(quantize_pages(k, v, fmt.bits_k, fmt.bits_v, fmt.v_chunk)) == set(FIELDS)


@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("page_size", [32, 128])
def test_install_page_from_wire_bytes_is_what_write_page_stores(fmt_name, page_size):
    fmt = PageFormat(fmt_name, 3, 64, page_size=page_size)
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(page_size, 3, 64, generator=g), torch.randn(page_size, 3, 64, generator=g)
    payload = pack(fmt, Span(1, 4, page_size, "page"), k, v)
    assert len(payload) == fmt.num_kv_heads * fmt.head_page_bytes
    written, installed = PagedCodeStore.allocate(fmt, 1, 2), PagedCodeStore.allocate(fmt, 1, 2)
    written.write_page(0, 1, k, v)
    installed.install_page(0, 1, payload)
    for name in FIELDS:
        assert torch.equal(written.fields[name], installed.fields[name]), name
    with pytest.raises(ValueError, match="payload"):
        installed.install_page(0, 0, payload[:-8])


def test_install_quant_pages_keeps_the_codes():
    fmt = PageFormat("hack2", 2, 64)
    g = torch.Generator().manual_seed(3)
    heads = [quantize_page(torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g), 2, 2, 64) for _ in "ab"]
    store = PagedCodeStore.allocate(fmt, 1, 1)
    store.install_quant_pages(0, 0, heads)
    for got, want in zip(store.read_page(0, 0), heads, strict=True):
        assert torch.equal(got.k_codes, want.k_codes) and torch.equal(got.v_sums, want.v_sums)


@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("page_size", [32, 64, 128])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize(("pages", "open_lens"), [([3, 1], [5, 0]), ([0, 2], [9, 1])])
def test_paged_torch_matches_reference_and_dequant(fmt_name, page_size, group, pages, open_lens):
    fmt = PageFormat(fmt_name, 2, 64, page_size=page_size)
    open_lens = [min(o, page_size - 1) for o in open_lens]
    c = _case(fmt, 2, pages, open_lens, group, seed=page_size + group)
    got = paged_decode_attention_torch(**c)
    assert got.shape == c["q"].shape and got.dtype == torch.float32
    _close_to_oracle(got, _oracle(c, int8=True))
    exact = paged_decode_attention_torch(**c, int8=False)
    dense = _dequant_then_attend(c)
    torch.testing.assert_close(exact, dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(dequant_decode_attention_torch(**c), dense, atol=1e-5, rtol=0)
    rel = (got - dense).norm() / dense.norm()
    assert rel < 0.10 * math.sqrt(page_size / 128), rel
    if sum(pages):
        assert (got - dense).abs().max() > 0  # the INT8 path really ran


def test_chunked_pages_equal_one_shot_and_single_open_row():
    fmt = PageFormat("hack2", 2, 64, page_size=32)
    c = _case(fmt, 3, [5, 3, 0], [0, 31, 1], group=2, seed=7)
    c["sink_lens"] = torch.tensor([0, 4, 0])  # a sequence made of pages only, and one of a single open row
    torch.testing.assert_close(
        paged_decode_attention_torch(**c, pages_per_chunk=2), paged_decode_attention_torch(**c), atol=1e-6, rtol=0
    )
    _close_to_oracle(paged_decode_attention_torch(**c), _oracle(c, int8=True))
    one = paged_decode_attention_torch(**c)[2]
    v_row = c["open_v"][2, 0].float().repeat_interleave(2, 0)  # softmax over one row = that row's V
    torch.testing.assert_close(one, v_row, atol=1e-6, rtol=0)


def test_custom_scale_is_used():
    fmt = PageFormat("hack4", 1, 64)
    c = _case(fmt, 1, [2], [3], group=1, seed=9)
    a = paged_decode_attention_torch(**c, scale=0.5 / math.sqrt(64))
    c2 = dict(c, q=c["q"] * 0.5)
    torch.testing.assert_close(a, paged_decode_attention_torch(**c2), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: c.update(q=c["q"][:, :, :32]), "q"),
        (lambda c: c.update(page_tables=c["page_tables"][:1]), "page_tables"),
        (lambda c: c.update(num_pages=torch.tensor([9, 0])), "num_pages"),
        (lambda c: c.update(open_lens=torch.tensor([99, 0])), "open_lens"),
        (lambda c: c.update(sinks_v=c["sinks_v"][:, :2]), "sinks_v"),
        (lambda c: c.update(layer=5), "layer"),
        (
            lambda c: c.update(
                sink_lens=torch.tensor([0, 0]), open_lens=torch.tensor([0, 0]), num_pages=torch.tensor([1, 0])
            ),
            "lengths",
        ),
    ],
)
def test_bad_inputs_name_the_argument(change, field):
    c = _case(PageFormat("hack2", 2, 64), 2, [1, 0], [3, 0], group=2)
    change(c)
    with pytest.raises(ValueError, match=field):
        paged_decode_attention_torch(**c)


def test_store_rejects_bad_writes():
    with pytest.raises(ValueError, match="fmt"):
        PagedCodeStore.allocate(PageFormat("bf16", 2, 64), 1, 1)
    store = PagedCodeStore.allocate(PageFormat("hack2", 2, 64), 1, 2)
    with pytest.raises(ValueError, match="k/v"):
        store.write_page(0, 0, torch.zeros(63, 2, 64), torch.zeros(63, 2, 64))
    with pytest.raises(ValueError, match="page_ids"):
        store.write_page(0, 2, torch.zeros(64, 2, 64), torch.zeros(64, 2, 64))


def test_chunked_prefill_rows_over_cached_pages_are_causal():
    """A prefill chunk of n tokens over 3 cached pages: one row per query token, the same page table, the
    chunk's rows as open rows with causal counts; equals causal float attention over the dequantized pages
    (int8=False: exact identity, 1e-5)."""
    fmt = PageFormat("hack-k4v2", 2, 64, page_size=32)
    c = _case(fmt, 1, [3], [12], group=2, seed=5)
    n = 12
    rep = {k: c[k].expand(n, *c[k].shape[1:]) for k in ("page_tables", "sinks_k", "sinks_v", "open_k", "open_v")}
    q = torch.randn(n, 4, 64, generator=torch.Generator().manual_seed(6))
    rows = dict(c, **rep, q=q, num_pages=c["num_pages"].expand(n), sink_lens=c["sink_lens"].expand(n))
    rows["open_lens"] = torch.arange(1, n + 1)
    got = paged_decode_attention_torch(**rows, int8=False)
    for i in range(n):
        one = dict(rows, q=q[i : i + 1], open_lens=torch.tensor([i + 1]))
        one.update({k: v[:1] for k, v in rep.items()}, num_pages=c["num_pages"], sink_lens=c["sink_lens"])
        torch.testing.assert_close(got[i : i + 1], _dequant_then_attend(one), atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], got[-1])  # later rows see more of the chunk
