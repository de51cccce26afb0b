"""KV frames: span split, byte-exact pack/unpack for bf16 and fp8, layer-wise framing as rows arrive."""

from __future__ import annotations

import pytest
import torch

from stageserve.kvcodec import wire
from stageserve.kvcodec.format import PageFormat
from stageserve.kvcodec.rotation import format_roundtrip

H, D = 3, 64


def test_spans_follow_the_page_convention():
    fmt = PageFormat("bf16", H, D)
    spans = wire.spans(fmt, 4 + 64 * 2 + 10)
    assert [(s.kind, s.start, s.length) for s in spans] == [
        ("sinks", 0, 4),
        ("page", 4, 64),
        ("page", 68, 64),
        ("tail", 132, 10),
    ]
    assert [s.index for s in spans] == [0, 1, 2, 3]
    assert [(s.kind, s.length) for s in wire.spans(fmt, 3)] == [("sinks", 3)]


@pytest.mark.parametrize("name", ["bf16", "fp8"])
@pytest.mark.parametrize("num_tokens", [3, 68, 100])
def test_pack_unpack_round_trip_and_sizes(name, num_tokens):
    fmt = PageFormat(name, H, D)
    torch.manual_seed(0)
    k, v = torch.randn(num_tokens, H, D) * 3, torch.randn(num_tokens, H, D)
    total = 0
    for span in wire.spans(fmt, num_tokens):
        payload = wire.pack(fmt, span, k[span.start : span.end], v[span.start : span.end])
        total += len(payload)
        k2, v2 = wire.unpack(fmt, span, payload)
        ref_k, ref_v = k[span.start : span.end], v[span.start : span.end]
        if name == "bf16" or span.kind == "sinks":  # sinks always travel as BF16
            assert torch.equal(k2, ref_k.bfloat16().float()) and torch.equal(v2, ref_v.bfloat16().float())
        else:  # E4M3 has 3 mantissa bits: relative error <= 2^-4 of the head's max, plus scale rounding
            assert (k2 - ref_k).abs().max() <= ref_k.abs().max() * 0.07
            assert (v2 - ref_v).abs().max() <= ref_v.abs().max() * 0.07
    assert total == fmt.request_bytes(num_tokens, 1, wire=True)


def test_checksum_detects_a_flipped_bit():
    payload = bytes(range(256)) * 4
    damaged = bytes([payload[0] ^ 1]) + payload[1:]
    assert wire.checksum(payload) != wire.checksum(damaged)


def test_framer_emits_each_span_once_rows_exist_in_any_chunking():
    fmt = PageFormat("bf16", H, D)
    n = 4 + 64 + 20
    k, v = torch.randn(n, H, D), torch.randn(n, H, D)
    framer = wire.LayerFramer(fmt, num_layers=2, num_tokens=n)
    got = framer.add(0, 0, k[:10], v[:10])
    assert [s.kind for s, _ in got] == ["sinks"]
    got = framer.add(0, 10, k[10:60], v[10:60])
    assert got == []  # the first page (4..68) is not complete yet
    got = framer.add(0, 60, k[60:], v[60:])
    assert [s.kind for s, _ in got] == ["page", "tail"]
    page_k, _ = wire.unpack(fmt, got[0][0], got[0][1])
    assert torch.equal(page_k, k[4:68].bfloat16().float())
    assert [s.kind for s, _ in framer.add(1, 0, k, v)] == ["sinks", "page", "tail"]
    with pytest.raises(ValueError, match="expected"):
        framer.add(1, 5, k[:1], v[:1])


@pytest.mark.parametrize(("name", "bits"), [("hack2", 2), ("hack4", 4), ("hack-k4v2", 2), ("kivi2", 2)])
def test_code_formats_round_trip_within_their_quantization_step(name, bits):
    fmt = PageFormat(name, H, D)
    torch.manual_seed(1)
    n = 4 + 64 + 30
    k, v = torch.randn(n, H, D), torch.randn(n, H, D)
    total = 0
    for span in wire.spans(fmt, n):
        payload = wire.pack(fmt, span, k[span.start : span.end], v[span.start : span.end])
        total += len(payload)
        k2, v2 = wire.unpack(fmt, span, payload)
        ref_k, ref_v = k[span.start : span.end], v[span.start : span.end]
        if span.kind == "sinks":
            assert torch.equal(k2, ref_k.bfloat16().float())
            continue
        b_k, b_v = (fmt.bits_k, fmt.bits_v) if span.kind == "page" else (fmt.tail_bits, fmt.tail_bits)
        # round-to-nearest: error <= half a step (range / (2^b - 1) / 2) plus BF16 rounding of scale and min
        k_step = (ref_k.amax(0) - ref_k.amin(0)) / ((1 << b_k) - 1)
        assert ((k2 - ref_k).abs() <= k_step / 2 * 1.05 + 0.02).all()
        v_step = (ref_v.amax(-1, keepdim=True) - ref_v.amin(-1, keepdim=True)) / ((1 << b_v) - 1)
        assert ((v2 - ref_v).abs() <= v_step / 2 * 1.05 + 0.02).all()
    assert total == fmt.request_bytes(n, 1, wire=True)


@pytest.mark.parametrize("name", ["hack2r", "hack-k4v2r"])
def test_rotated_formats_carry_rotated_k_codes_and_restore_the_cached_values(name):
    fmt = PageFormat(name, H, D)
    base = PageFormat(fmt.base_format, H, D)
    assert fmt.k_rotation == "hadamard" and fmt.field_layout() == base.field_layout()
    torch.manual_seed(2)
    n = 4 + 64 + 30
    k, v = torch.randn(n, H, D), torch.randn(n, H, D)
    k[:, :, 3] *= 8  # an outlier channel
    total = 0
    for span in wire.spans(fmt, n):
        payload = wire.pack(fmt, span, k[span.start : span.end], v[span.start : span.end])
        total += len(payload)
        k2, v2 = wire.unpack(fmt, span, payload)
        if span.kind != "page":
            continue
        assert payload != wire.pack(base, span, k[span.start : span.end], v[span.start : span.end])
        # the page holds the codes of K @ R; unpacking rotates back to what the decode cache stores
        rows = slice(span.start, span.end)
        ref_k, ref_v = format_roundtrip(fmt, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
        assert torch.allclose(k2, ref_k.transpose(0, 1), atol=1e-5)
        assert torch.allclose(v2, ref_v.transpose(0, 1), atol=1e-6)
    assert total == fmt.request_bytes(n, 1, wire=True) == base.request_bytes(n, 1, wire=True)
