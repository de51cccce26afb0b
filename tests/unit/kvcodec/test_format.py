"""PageFormat: byte sizes from papers.md §1.3/§1.8, offsets, sum widths, validation (pure, no torch)."""

from __future__ import annotations

import ast
import sys

import pytest

from stageserve.kvcodec.format import FORMATS, PageFormat

LLAMA8B = (8, 128)  # Llama-3.1-8B num_kv_heads, head_dim (32 layers)
SMOL = (3, 64)  # SmolLM2-135M num_kv_heads, head_dim (30 layers)


def test_pure_stdlib_only() -> None:
    import stageserve.kvcodec.format as fmt_mod
    import stageserve.kvcodec.report as report_mod

    for mod in (fmt_mod, report_mod):
        tree = ast.parse(open(str(mod.__file__), encoding="utf-8").read())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert roots <= set(sys.stdlib_module_names) | {"stageserve"}, roots


# ---- papers.md §1.3 table -------------------------------------------------------------------------------
def test_paper_table_d128_pi64() -> None:
    f = PageFormat("hack2", 1, 128, page_size=64)
    sizes = {k: n for k, (_, n) in f.field_offsets().items()}
    assert sizes == {
        "k_codes": 2048,
        "k_scale": 256,
        "k_min": 256,
        "k_sums": 128,
        "v_codes": 2048,
        "v_scale": 256,
        "v_min": 256,
        "v_sums": 128,
    }
    assert f.head_page_bytes == 5376


def test_paper_table_d64_pi64() -> None:
    f = PageFormat("hack2", 1, 64, page_size=64)
    sizes = [n for _, n in f.field_offsets().values()]
    assert sizes == [1024, 128, 128, 64, 1024, 128, 128, 64]
    assert f.head_page_bytes == 2688
    assert f.k_sums_dtype == "u8" and f.v_sums_dtype == "u8"  # 3 * 64 = 192 <= 255


# ---- papers.md §1.8 Example 1: 8 KV heads, d=128 ---------------------------------------------------------
@pytest.mark.parametrize(
    ("page_size", "layer_bytes", "ratio_pct"),
    [(32, 26_624, 20.3), (64, 43_008, 16.4), (128, 77_824, 14.8)],
)
def test_llama8b_layer_pages(page_size: int, layer_bytes: int, ratio_pct: float) -> None:
    f = PageFormat("hack2", *LLAMA8B, page_size=page_size)
    assert f.layer_page_bytes == layer_bytes
    bf16_page = PageFormat("bf16", *LLAMA8B, page_size=page_size).layer_page_bytes
    assert bf16_page == page_size * 8 * 2 * 128 * 2
    assert round(100 * layer_bytes / bf16_page, 1) == ratio_pct
    # padding to a multiple of 4*Pi is a no-op for d=128
    assert PageFormat("hack2", *LLAMA8B, page_size=page_size, pad_pages=True).layer_page_bytes == layer_bytes


def test_llama8b_per_token() -> None:
    f = PageFormat("hack2", *LLAMA8B)
    assert f.head_page_bytes / 64 == 84  # 64 + 8 + 2 + 8 + 2
    assert f.bytes_per_token_steady == 672
    assert f.bf16_bytes_per_token == 4096
    assert f.layer_page_bytes == 8 * 5376 == 43_008


def test_pi128_sums_become_u16() -> None:
    f = PageFormat("hack2", *LLAMA8B, page_size=128)
    assert f.k_sums_dtype == "u16" and f.v_sums_dtype == "u16"  # 3 * 128 = 384 > 255
    lay = f.field_layout()
    assert lay["k_sums"].nbytes == 128 * 1 * 2 and lay["v_sums"].nbytes == 128 * 2
    assert f.head_page_bytes == 9728


def test_link_rule_16k_llama8b() -> None:
    """§1.8 link rule: 16K prompt, 32 layers: 2.15 GB BF16, ~0.35 GB HACK (steady-state)."""
    f = PageFormat("hack2", *LLAMA8B)
    assert round(f.bf16_request_bytes(16384, 32) / 1e9, 2) == 2.15
    assert round(f.bytes_per_token_steady * 32 * 16384 / 1e9, 2) == 0.35
    # with sinks + BF16 open block the exact request is a little larger
    assert round(f.request_bytes(16384, 32, wire=False) / 1e9, 2) == 0.36


# ---- papers.md §1.8 Example 2: SmolLM2 --------------------------------------------------------------------
def test_smollm2_steady_state() -> None:
    f = PageFormat("hack2", *SMOL)
    assert f.bf16_bytes_per_token * 30 == 23_040
    assert f.layer_page_bytes == 8064
    assert f.bytes_per_token_steady == 126
    assert f.bytes_per_token_steady * 30 == 3780
    assert round(100 * 3780 / 23_040, 1) == 16.4
    padded = PageFormat("hack2", *SMOL, pad_pages=True)
    assert padded.head_page_bytes == 2688  # padding applies to the layer page, not the head page
    assert padded.layer_page_bytes == 8192
    assert padded.bytes_per_token_steady * 30 == 3840
    assert round(100 * 3840 / 23_040, 1) == 16.7


def test_smollm2_2048_prompt() -> None:
    f = PageFormat("hack2", *SMOL)
    assert f.split_tokens(2048) == (4, 31, 60)
    assert f.request_bytes(2048, 30, wire=False) == 31 * 8064 * 30 + 64 * 23_040 == 8_974_080
    assert f.bf16_request_bytes(2048, 30) == 47_185_920
    assert round(100 * 8_974_080 / 47_185_920, 1) == 19.0
    assert round(100 * f.request_bytes(512, 30, wire=False) / f.bf16_request_bytes(512, 30), 1) == 26.9


# ---- layout invariants ------------------------------------------------------------------------------------
ALL_CASES = [(fmt, pi, d) for fmt in FORMATS for pi in (32, 64, 128) for d in (64, 80, 128, 256)]


@pytest.mark.parametrize(("fmt", "pi", "d"), ALL_CASES)
def test_offsets_aligned_non_overlapping(fmt: str, pi: int, d: int) -> None:
    f = PageFormat(fmt, 2, d, page_size=pi)
    end = 0
    for name, (off, n) in f.field_offsets().items():
        assert off % 8 == 0, name
        assert off >= end, name
        assert n > 0
        end = off + n
    assert end <= f.head_page_bytes and f.head_page_bytes % 8 == 0
    assert f.layer_page_bytes == 2 * f.head_page_bytes
    if f.pad_pages is False:
        padded = PageFormat(fmt, 2, d, page_size=pi, pad_pages=True)
        assert padded.layer_page_bytes % (4 * pi) == 0
        assert 0 <= padded.layer_page_bytes - f.layer_page_bytes < 4 * pi


@pytest.mark.parametrize(("fmt", "pi", "d"), ALL_CASES)
def test_tail_layout_aligned(fmt: str, pi: int, d: int) -> None:
    f = PageFormat(fmt, 1, d, page_size=pi)
    for n in (1, 7, pi - 1):
        end = 0
        for name, spec in f.tail_field_layout(n).items():
            assert spec.offset % 8 == 0 and spec.offset >= end, name
            end = spec.offset + spec.nbytes
        assert f.tail_bytes(n) >= end


def test_field_order_and_shapes() -> None:
    f = PageFormat("hack-k4v2", 1, 128, page_size=64)
    lay = f.field_layout()
    assert list(lay) == ["k_codes", "k_scale", "k_min", "k_sums", "v_codes", "v_scale", "v_min", "v_sums"]
    assert lay["k_codes"].shape == (64, 64) and lay["v_codes"].shape == (64, 32)
    assert lay["k_sums"].shape == (64, 2) and lay["v_scale"].shape == (64, 2) and lay["v_sums"].shape == (128,)
    assert (f.bits_k, f.bits_v) == (4, 2)


def test_bf16_and_fp8_layouts() -> None:
    b = PageFormat("bf16", 8, 128, page_size=64)
    assert b.layer_page_bytes == 2 * 64 * 8 * 128 * 2
    assert b.bytes_per_token_steady == b.bf16_bytes_per_token == 4096
    assert list(b.field_offsets()) == ["k", "v"]
    f8 = PageFormat("fp8", 1, 128, page_size=64)
    assert f8.field_offsets() == {
        "k_codes": (0, 8192),
        "k_scale": (8192, 2),
        "v_codes": (8200, 8192),
        "v_scale": (16392, 2),
    }
    assert f8.head_page_bytes == 2 * 64 * 128 + 16
    assert f8.k_sums_dtype is None and (f8.bits_k, f8.bits_v) == (8, 8)


def test_kivi2_same_bytes_as_hack2() -> None:
    for pi in (32, 64, 128):
        k, h = PageFormat("kivi2", 8, 128, page_size=pi), PageFormat("hack2", 8, 128, page_size=pi)
        assert k.field_layout() == h.field_layout()
        assert not k.computes_on_codes and h.computes_on_codes


# ---- sum widths -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "pi", "d", "ks", "vs"),
    [
        ("hack2", 32, 128, "u8", "u8"),  # 3*32, 3*32
        ("hack2", 64, 128, "u8", "u8"),  # 192, 192
        ("hack2", 128, 128, "u16", "u16"),  # 384
        ("hack2", 128, 64, "u8", "u16"),  # p = 64: 192; 3*128 = 384
        ("hack4", 32, 128, "u16", "u16"),  # 15*32 = 480
        ("hack-k4v2", 64, 128, "u16", "u8"),  # 15*64 = 960; 3*64 = 192
    ],
)
def test_sum_width_switching(fmt: str, pi: int, d: int, ks: str, vs: str) -> None:
    f = PageFormat(fmt, 1, d, page_size=pi)
    expect_ks = "u8" if ((1 << f.bits_k) - 1) * f.v_chunk <= 255 else "u16"
    expect_vs = "u8" if ((1 << f.bits_v) - 1) * pi <= 255 else "u16"
    assert (f.k_sums_dtype, f.v_sums_dtype) == (expect_ks, expect_vs) == (ks, vs)
    assert f.field_layout()["k_sums"].dtype == ks and f.field_layout()["v_sums"].dtype == vs


def test_hack4_sums_u16_and_small_chunk_u8() -> None:
    f = PageFormat("hack4", 1, 128, page_size=32)
    assert (f.k_sums_dtype, f.v_sums_dtype) == ("u16", "u16")  # 15*32 = 480
    small = PageFormat("hack4", 1, 128, page_size=32, v_chunk=16)  # 15*16 = 240
    assert small.k_sums_dtype == "u8"
    assert small.field_layout()["k_sums"].shape == (32, 8)


# ---- wire tail and requests -------------------------------------------------------------------------------
def test_tail_is_hack4_layout_of_n_rows() -> None:
    f = PageFormat("hack2", 1, 128, page_size=64)
    lay = f.tail_field_layout(60)
    assert lay["k_codes"].shape == (60, 64) and lay["v_codes"].shape == (60, 64)  # 4-bit codes
    assert lay["k_scale"].shape == (128,) and lay["v_scale"].shape == (60, 2)
    assert lay["k_sums"].dtype == "u16" and lay["v_sums"].dtype == "u16"  # as a full hack4 page
    # a full-size tail would equal a hack4 page
    hack4 = PageFormat("hack4", 1, 128, page_size=64)
    expect = 3840 + 256 + 256 + 240 + 3840 + 240 + 240 + 256  # 60 rows, aligned
    assert f.tail_bytes(60) == expect
    assert f.tail_bytes(60) < hack4.head_page_bytes
    assert f.tail_bytes(0) == 0
    with pytest.raises(ValueError, match="n_tokens"):
        f.tail_bytes(64)


def test_tail_bits_variants() -> None:
    bf = PageFormat("hack2", 3, 64, tail_bits=16)
    assert bf.tail_bytes(10) == 10 * bf.bf16_bytes_per_token
    assert bf.request_bytes(2048, 30, wire=True) == bf.request_bytes(2048, 30, wire=False)
    two = PageFormat("hack2", 3, 64, tail_bits=2)
    four = PageFormat("hack2", 3, 64)
    assert two.tail_bytes(60) < four.tail_bytes(60) < bf.tail_bytes(60)
    assert PageFormat("fp8", 1, 128).tail_bytes(10) == 10 * 128 + 8 + 10 * 128 + 8


def test_request_bytes_split() -> None:
    f = PageFormat("hack2", *SMOL)
    assert f.split_tokens(0) == (0, 0, 0)
    assert f.split_tokens(3) == (3, 0, 0)
    assert f.split_tokens(68) == (4, 1, 0)
    assert f.split_tokens(67) == (4, 0, 63)
    assert f.request_bytes(68, 2, wire=True) == 2 * (4 * 768 + 8064)
    wire = f.request_bytes(2048, 30, wire=True)
    assert wire == 30 * (4 * 768 + 31 * 8064 + f.tail_bytes(60))
    assert wire < f.request_bytes(2048, 30, wire=False)
    b = PageFormat("bf16", *SMOL)
    for t in (0, 3, 67, 2048):
        assert b.request_bytes(t, 30, wire=True) == b.request_bytes(t, 30, wire=False) == b.bf16_request_bytes(t, 30)


def test_sizes_order_between_formats() -> None:
    def size(fmt: str) -> int:
        return PageFormat(fmt, 8, 128).layer_page_bytes

    assert size("hack2") == size("kivi2") < size("hack-k4v2") < size("hack4") < size("fp8") < size("bf16")


# ---- validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"format": "int3"}, "format"),
        ({"page_size": 16}, "page_size"),
        ({"page_size": 256}, "page_size"),
        ({"num_kv_heads": 0}, "num_kv_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"head_dim": 100}, "head_dim"),
        ({"v_chunk": 48}, "v_chunk"),
        ({"v_chunk": -8}, "v_chunk"),
        ({"num_sinks": -1}, "num_sinks"),
        ({"tail_bits": 3}, "tail_bits"),
        ({"meta_dtype": "fp16"}, "meta_dtype"),
    ],
)
def test_validation(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"format": "hack2", "num_kv_heads": 8, "head_dim": 128}
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{field}"):
        PageFormat(**args)  # type: ignore[arg-type]


def test_default_v_chunk_and_frozen() -> None:
    assert PageFormat("hack2", 1, 80, page_size=64).v_chunk == 16  # min(64, 80) does not divide 80 -> gcd
    assert PageFormat("hack2", 1, 96, page_size=128).v_chunk == 96
    assert PageFormat("hack2", 1, 128, page_size=32).v_chunk == 32
    assert PageFormat("hack2", 1, 64, page_size=128).v_chunk == 64
    f = PageFormat("hack2", 1, 128)
    assert f == PageFormat("hack2", 1, 128, v_chunk=64)
    with pytest.raises(AttributeError):
        f.page_size = 32  # type: ignore[misc]
    with pytest.raises(ValueError, match="num_tokens"):
        f.split_tokens(-1)
    with pytest.raises(ValueError, match="num_layers"):
        f.request_bytes(10, 0, wire=False)
