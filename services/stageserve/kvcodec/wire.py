"""KV pages on the wire: which spans of a prompt travel as which frame, and their bytes.

A prompt of T tokens is cut by ``PageFormat``'s convention into the sinks (tokens 0..S-1, always BF16),
closed pages of Π tokens, and the tail (the open block), each sent per layer as one frame as soon as that
layer's rows for it exist. Payload bytes follow the format's field layout exactly (one KV head after the
other); a CRC-32 of the payload travels in the frame header. Formats: ``bf16``, ``fp8`` (E4M3 codes with
one BF16 scale per head per page per tensor) and the HACK code formats (``hack2``, ``hack4``, ``hack-k4v2``,
``kivi2``: 2/4-bit codes with BF16 scales and mins, cached code sums; the tail is sent with
``tail_bits``-bit codes and its own scales, see ``kvcodec.reference``). Rotated formats (``hack2r``, ...) carry
the codes of the rotated K (``kvcodec.rotation``) in every coded span (pages and a quantized tail); sinks and a
BF16 tail are not rotated; ``unpack`` returns K rotated back.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from stageserve.kvcodec.format import FieldSpec, PageFormat
from stageserve.kvcodec.reference import QuantPage, dequantize_page, pack_codes, quantize_page, unpack_codes
from stageserve.kvcodec.rotation import rotate, unrotate

# formats the serving stages advertise (those with a KVFormat id in the protos); pack/unpack take any PageFormat
WIRE_FORMATS = ("bf16", "fp8", "hack2", "hack4", "hack-k4v2", "kivi2")
_TORCH_DTYPES = {"u8": torch.uint8, "u16": torch.uint16, "bf16": torch.bfloat16}
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class Span:
    """Positions [start, start + length) of one frame; index 0 is the sinks, then pages, then the tail."""

    index: int
    start: int
    length: int
    kind: str  # sinks | page | tail

    @property
    def end(self) -> int:
        return self.start + self.length


def spans(fmt: PageFormat, num_tokens: int) -> list[Span]:
    sinks = min(num_tokens, fmt.num_sinks)
    out = [Span(0, 0, sinks, "sinks")] if sinks else []
    start = sinks
    while start + fmt.page_size <= num_tokens:
        out.append(Span(len(out), start, fmt.page_size, "page"))
        start += fmt.page_size
    if start < num_tokens:
        out.append(Span(len(out), start, num_tokens - start, "tail"))
    return out


def checksum(payload: bytes) -> int:
    return zlib.crc32(payload) & 0xFFFFFFFF


def _layout(fmt: PageFormat, span: Span) -> tuple[PageFormat, Mapping[str, FieldSpec]]:
    if span.kind == "sinks":
        bf16 = PageFormat("bf16", fmt.num_kv_heads, fmt.head_dim, page_size=fmt.page_size)
        return bf16, bf16.tail_field_layout(span.length)
    if span.kind == "page":
        return fmt, fmt.field_layout()
    return fmt, fmt.tail_field_layout(span.length)


def _head_bytes(layout: Mapping[str, FieldSpec]) -> int:
    end = max(f.offset + f.nbytes for f in layout.values())
    return -(-end // 8) * 8


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _fp8_fields(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, d] float -> (E4M3 codes [n, d], BF16 scale [1]); the scale is rounded to BF16 before use."""
    scale = (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12).to(torch.bfloat16)
    codes = (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale.reshape(1)


def pack(fmt: PageFormat, span: Span, k: torch.Tensor, v: torch.Tensor) -> bytes:
    """k, v [span.length, H, D] (any float dtype) -> payload bytes of one layer's frame."""
    if k.shape != (span.length, fmt.num_kv_heads, fmt.head_dim) or v.shape != k.shape:
        raise ValueError(f"KV rows {tuple(k.shape)} do not match span of {span.length} tokens")
    kind, layout = _layout(fmt, span)
    head = _head_bytes(layout)
    buf = bytearray(head * fmt.num_kv_heads)
    bits = _bits(fmt, span)
    rot = _rotation(fmt, span)
    for h in range(fmt.num_kv_heads):
        fields = _head_fields(kind.format, rotate(k[:, h], rot), v[:, h], bits, fmt.v_chunk)
        for name, spec in layout.items():
            data = _as_bytes(fields[name].to(_TORCH_DTYPES[spec.dtype]))
            assert len(data) == spec.nbytes, (name, len(data), spec.nbytes)
            buf[h * head + spec.offset : h * head + spec.offset + spec.nbytes] = data
    return bytes(buf)


def _bits(fmt: PageFormat, span: Span) -> tuple[int, int]:
    """(K bits, V bits) of a span: the format's for full pages, ``tail_bits`` for the tail."""
    if span.kind == "tail" and fmt.format not in ("bf16", "fp8"):
        return fmt.tail_bits, fmt.tail_bits
    return fmt.bits_k, fmt.bits_v


def _rotation(fmt: PageFormat, span: Span) -> str:
    """The K rotation of a span's codes: the format's for coded spans, none for BF16 ones."""
    if span.kind == "sinks" or _bits(fmt, span) == (16, 16):
        return "none"
    return fmt.k_rotation


def _head_fields(
    format_name: str, k: torch.Tensor, v: torch.Tensor, bits: tuple[int, int], v_chunk: int
) -> dict[str, torch.Tensor]:
    if format_name == "bf16" or bits == (16, 16):
        return {"k": k.to(torch.bfloat16), "v": v.to(torch.bfloat16)}
    if format_name == "fp8":
        k_codes, k_scale = _fp8_fields(k)
        v_codes, v_scale = _fp8_fields(v)
        return {
            "k_codes": k_codes.view(torch.uint8),
            "k_scale": k_scale,
            "v_codes": v_codes.view(torch.uint8),
            "v_scale": v_scale,
        }
    page = quantize_page(k, v, bits[0], bits[1], v_chunk)
    return {
        "k_codes": pack_codes(page.k_codes, bits[0]),
        "k_scale": page.k_scale,
        "k_min": page.k_min,
        "k_sums": page.k_sums,
        "v_codes": pack_codes(page.v_codes, bits[1]),
        "v_scale": page.v_scale,
        "v_min": page.v_min,
        "v_sums": page.v_sums,
    }


def unpack(fmt: PageFormat, span: Span, payload: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Payload bytes -> k, v [span.length, H, D] float32 (dequantized; nothing is re-quantized)."""
    kind, layout = _layout(fmt, span)
    head = _head_bytes(layout)
    if len(payload) != head * fmt.num_kv_heads:
        raise ValueError(f"payload of {len(payload)} bytes, expected {head * fmt.num_kv_heads}")
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    bits = _bits(fmt, span)
    rot = _rotation(fmt, span)
    ks, vs = [], []
    for h in range(fmt.num_kv_heads):
        fields = {
            name: raw[h * head + spec.offset : h * head + spec.offset + spec.nbytes]
            .view(_TORCH_DTYPES[spec.dtype])
            .reshape(spec.shape)
            for name, spec in layout.items()
        }
        k, v = _head_values(kind.format, fields, bits, fmt.v_chunk)
        ks.append(unrotate(k, rot))
        vs.append(v)
    return torch.stack(ks, dim=1), torch.stack(vs, dim=1)


def _head_values(
    format_name: str, f: dict[str, torch.Tensor], bits: tuple[int, int], v_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if "k" in f:
        return f["k"].float(), f["v"].float()
    if format_name == "fp8":
        fp8 = torch.float8_e4m3fn
        return (
            f["k_codes"].view(fp8).float() * f["k_scale"].float(),
            f["v_codes"].view(fp8).float() * f["v_scale"].float(),
        )
    page = QuantPage(
        unpack_codes(f["k_codes"], bits[0]),
        f["k_scale"],
        f["k_min"],
        f["k_sums"].to(torch.int32),
        unpack_codes(f["v_codes"], bits[1]),
        f["v_scale"],
        f["v_min"],
        f["v_sums"].to(torch.int32),
        v_chunk,
    )
    return dequantize_page(page)


class LayerFramer:
    """Collects one request's KV rows as the prefill forward produces them (per layer, in chunks) and
    returns each span's frame payload as soon as all of its rows exist in that layer."""

    def __init__(self, fmt: PageFormat, num_layers: int, num_tokens: int) -> None:
        self.fmt = fmt
        self.spans = spans(fmt, num_tokens)
        self._k: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._v: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._have = [0] * num_layers
        self._next = [0] * num_layers

    def add(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> list[tuple[Span, bytes]]:
        if start != self._have[layer]:
            raise ValueError(f"layer {layer}: rows from {start} but {self._have[layer]} expected")
        self._k[layer].append(k.detach().clone())
        self._v[layer].append(v.detach().clone())
        self._have[layer] += k.shape[0]
        ready: list[tuple[Span, bytes]] = []
        while self._next[layer] < len(self.spans) and self.spans[self._next[layer]].end <= self._have[layer]:
            span = self.spans[self._next[layer]]
            k_all, v_all = torch.cat(self._k[layer]), torch.cat(self._v[layer])
            base = self._have[layer] - k_all.shape[0]
            ready.append(
                (
                    span,
                    pack(
                        self.fmt,
                        span,
                        k_all[span.start - base : span.end - base],
                        v_all[span.start - base : span.end - base],
                    ),
                )
            )
            keep = span.end - base
            self._k[layer], self._v[layer] = [k_all[keep:]], [v_all[keep:]]
            self._next[layer] += 1
        return ready
