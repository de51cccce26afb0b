"""Triton decode kernels vs the torch paths (TRITON_INTERPRET=1 on CPU: tiny shapes; compiled on a GPU).

Tolerances:
* HACK kernel vs ``paged_decode_attention_torch``: the same INT8 q̃/p̃ algorithm, integer dots exact in both
  (FP16 MMA with FP32 accumulation of integers < 2^24 in the kernel). Differences are float32 order and the
  rounding rule (kernel: floor(x + ½), torch: half-to-even), so they can flip an INT8 code that sits on a .5
  boundary; one flipped p̃ code moves an output by one INT8 step s_p·v′/l ≤ (v_scale/255)·(2^bv−1) ≈ 0.02
  (see tests/kvcodec/test_paged.py). Allowed 1e-2 max with 90 % of elements within 1e-4.
* Fused-dequant kernel vs ``dequant_decode_attention_torch``: the kernel rounds k̂, v̂, q and p to FP16
  (relative 2^-11 each) before its dots: ~1e-3 on outputs of size ~1; allowed 5e-3.
* BF16 kernel vs float SDPA: q and p rounded to BF16 (2^-8 relative): observed ~5e-3; allowed 2e-2.
* Cross-check: HACK kernel vs dequantize-then-attend within the INT8 bound of ``tests/kvcodec/test_paged.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from stageserve_kernels.bf16_decode import bf16_decode_attention, bf16_decode_attention_torch
from stageserve_kernels.dequant_decode import dequant_decode_attention
from stageserve_kernels.hack_decode import hack_decode_attention

from stageserve.kvcodec.format import PageFormat
from stageserve.kvcodec.paged import (
    PagedCodeStore,
    dequant_decode_attention_torch,
    paged_decode_attention_torch,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(fmt: PageFormat, pages: list[int], open_lens: list[int], group: int, seed: int = 0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    h, d, pi = fmt.num_kv_heads, fmt.head_dim, fmt.page_size
    b = len(pages)
    store = PagedCodeStore.allocate(fmt, num_layers=2, num_pages=max(2 * sum(pages), 1), device=device)
    ids = torch.randperm(store.num_pages, generator=g)[: sum(pages)]
    tables = torch.zeros(b, max(max(pages), 1), dtype=torch.long)
    start = 0
    for i, n in enumerate(pages):
        if n:
            k = torch.randn(n, pi, h, d, generator=g) * 2 + torch.randn(1, 1, h, d, generator=g)
            store.write_pages(1, ids[start : start + n], k, torch.randn(n, pi, h, d, generator=g))
            tables[i, :n] = ids[start : start + n]
        start += n
    o = max(max(open_lens), 1)

    def rows(n):
        return torch.randn(b, n, h, d, generator=g).bfloat16().to(device)

    return dict(
        q=torch.randn(b, h * group, d, generator=g).to(device),
        store=store,
        layer=1,
        page_tables=tables.to(device),
        num_pages=torch.tensor(pages, device=device),
        sinks_k=rows(fmt.num_sinks),
        sinks_v=rows(fmt.num_sinks),
        sink_lens=torch.full((b,), fmt.num_sinks, device=device),
        open_k=rows(o),
        open_v=rows(o),
        open_lens=torch.tensor(open_lens, device=device),
    )


def _close(got, want, max_err, frac_tol):
    diff = (got - want).abs()
    assert diff.max() < max_err, diff.max()
    assert (diff < frac_tol).float().mean() >= 0.9


CASES = [  # (format, Π, GQA ratio, pages per sequence, open rows per sequence, pages per split)
    ("hack2", 32, 4, [3, 1], [5, 0], 2),
    ("hack4", 32, 1, [2, 0], [0, 7], None),
    ("hack-k4v2", 64, 2, [1, 2], [63, 1], 1),
    ("hack2", 128, 8, [1], [3], None),
]


@pytest.mark.parametrize(("fmt_name", "page", "group", "pages", "open_lens", "pps"), CASES)
def test_hack_kernel_matches_torch_on_codes(fmt_name, page, group, pages, open_lens, pps):
    fmt = PageFormat(fmt_name, 2, 64, page_size=page)
    c = _case(fmt, pages, open_lens, group, seed=page + group)
    got = hack_decode_attention(**c, pages_per_split=pps)
    assert got.shape == c["q"].shape and got.dtype == torch.float32
    _close(got, paged_decode_attention_torch(**c), 1e-2, 1e-4)
    dense = paged_decode_attention_torch(**c, int8=False)  # = dequantize-then-attend (exact identity)
    assert (got - dense).norm() / dense.norm() < 0.10 * math.sqrt(page / 128)


@pytest.mark.parametrize(("fmt_name", "page", "group", "pages", "open_lens", "pps"), CASES[:3])
def test_dequant_kernel_matches_torch_dequant(fmt_name, page, group, pages, open_lens, pps):
    fmt = PageFormat(fmt_name if fmt_name != "hack2" else "kivi2", 2, 64, page_size=page)
    c = _case(fmt, pages, open_lens, group, seed=3)
    got = dequant_decode_attention(**c, pages_per_split=pps)
    _close(got, dequant_decode_attention_torch(**c), 5e-3, 2e-3)


@pytest.mark.parametrize(("page", "group", "lens", "pps"), [(32, 4, [70, 33], 1), (64, 1, [64, 1], None)])
def test_bf16_kernel_matches_sdpa(page, group, lens, pps):
    g = torch.Generator().manual_seed(page)
    n_pages = 6
    kp = torch.randn(n_pages, 2, page, 64, generator=g).bfloat16().to(DEVICE)
    vp = torch.randn(n_pages, 2, page, 64, generator=g).bfloat16().to(DEVICE)
    q = torch.randn(len(lens), 2 * group, 64, generator=g).to(DEVICE)
    tables = torch.randperm(n_pages, generator=g)[: 3 * len(lens)].reshape(len(lens), 3).to(DEVICE)
    seq = torch.tensor(lens, device=DEVICE)
    got = bf16_decode_attention(q, kp, vp, tables, seq, pages_per_split=pps)
    _close(got, bf16_decode_attention_torch(q, kp, vp, tables, seq), 2e-2, 1e-2)


def test_launchers_name_bad_arguments():
    c = _case(PageFormat("hack2", 2, 64, page_size=32), [1], [2], 2)
    with pytest.raises(ValueError, match="q"):
        hack_decode_attention(**dict(c, q=c["q"][..., :32]))
    with pytest.raises(ValueError, match="page_tables"):
        hack_decode_attention(**dict(c, page_tables=c["page_tables"].float()))
    with pytest.raises(ValueError, match="store"):
        hack_decode_attention(**dict(c, store=object()))
    with pytest.raises(ValueError, match="open_lens"):
        dequant_decode_attention(**dict(c, open_lens=torch.tensor([50], device=DEVICE)))
    kp = torch.zeros(2, 2, 32, 64, dtype=torch.bfloat16, device=DEVICE)
    q = torch.zeros(1, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="k_pages"):
        bf16_decode_attention(q, kp.float(), kp, torch.zeros(1, 2, dtype=torch.long), torch.tensor([3]))
    with pytest.raises(ValueError, match="seq_lens"):
        bf16_decode_attention(q, kp, kp, torch.zeros(1, 2, dtype=torch.long), torch.tensor([65]))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt_name", ["hack2", "hack4", "hack-k4v2"])
def test_compiled_kernels_on_gpu_llama_shape(fmt_name):
    """Compiled kernels at the Llama-3.1-8B head shape (32 q / 8 KV heads, d=128), 64 pages per sequence."""
    fmt = PageFormat(fmt_name, 8, 128, page_size=64)
    c = _case(fmt, [64, 17, 5], [10, 0, 63], 4, seed=11, device="cuda")
    _close(hack_decode_attention(**c), paged_decode_attention_torch(**c), 1e-2, 1e-4)
    _close(dequant_decode_attention(**c), dequant_decode_attention_torch(**c), 5e-3, 2e-3)


def test_bench_runs_every_implementation_on_the_same_values():
    """The kernel benchmark's cases: the Triton rows (interpreted on CPU) and the torch rows agree at the
    Llama-3.1-8B head shape (32 q / 8 KV heads, d=128, Π=64) on a 200-token sequence (3 pages + 4 sinks +
    4 open rows); tolerances as above, plus BF16 rounding of the stored values for the bf16/fp8 rows."""
    from stageserve_kernels.bench.decode_bench import _cpu_impls, _gpu_impls, _make_case

    case = _make_case(PageFormat("hack2", 8, 128), 1, 200, 32, DEVICE)
    cpu = {name: fn() for name, (fn, _) in _cpu_impls(case).items()}
    gpu = {name: fn() for name, (fn, _) in _gpu_impls(case).items()}
    _close(gpu["hack triton"], cpu["hack torch"], 1e-2, 1e-4)
    _close(gpu["dequant triton"], cpu["dequant torch"], 5e-3, 2e-3)
    _close(gpu["bf16 triton"], cpu["bf16 sdpa"], 2e-2, 1e-2)
    _close(cpu["dequant+sdpa"], cpu["dequant torch"], 1e-5, 1e-5)
    _close(cpu["bf16 sdpa"], cpu["dequant torch"], 2e-2, 1e-2)  # bf16 pages hold the dequantized values
