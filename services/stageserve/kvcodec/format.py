"""KV page layout: the single source of truth for page sizes and field offsets (pure, stdlib only).

The allocator, the wire packer and the kernels all read :class:`PageFormat`; nothing else computes a KV
byte size. See the design notes (papers.md HACK §1.3 and §1.8; DESIGN.md §4).

Sequence convention (per layer and KV head; S = ``num_sinks``, Π = ``page_size``, T tokens)
------------------------------------------------------------------------------------------------
* **Sinks**: tokens ``0 .. S-1`` (``min(T, S)`` of them), always BF16.
* **Closed block j** = tokens ``[S + jΠ, S + (j+1)Π)``; ``J = (T - S) // Π`` of them. One block = one page,
  quantized once when it fills and never rewritten.
* **Open block**: the remaining ``(T - S) mod Π`` tokens. In the decode cache it stays BF16; on the wire it
  is sent as a compact *tail* (a quantized partial page with its own scales, see :meth:`PageFormat.tail_bytes`).

The same split is used for every format (for ``bf16`` all three parts are BF16, so the split changes nothing).

Formats (``bits_k``/``bits_v``)
-------------------------------
``bf16`` (16/16), ``fp8`` (8/8, E4M3 codes), ``kivi2`` (2/2; same bytes as ``hack2`` but dequantized inside
the kernel: the baseline), ``hack2`` (2/2), ``hack4`` (4/4), ``hack-k4v2`` (4-bit K, 2-bit V), and the rotated
``hack2r``, ``hack4r``, ``hack-k4v2r``: the same layout and bytes, with each head's post-RoPE K multiplied by a
fixed orthogonal matrix (``k_rotation``) before quantization; the codes are of the rotated K, and decode
rotates q the same way (scores unchanged).

Page layout of one KV head (fields in this order; each field starts at an 8-byte aligned offset and the
head page is rounded up to a multiple of 8 bytes). Π rows, d = ``head_dim``, p = ``v_chunk``, g = d/p,
bk/bv = bits; metadata (scale, min) is BF16 (2 bytes).

* ``bf16``:  ``k`` [Π, d] bf16 · ``v`` [Π, d] bf16                        → 4Πd bytes
* ``fp8``:   ``k_codes`` [Π, d] u8 (E4M3) · ``k_scale`` [1] bf16 · ``v_codes`` [Π, d] u8 · ``v_scale`` [1] bf16
  (one BF16 scale per KV head per page per tensor; each scale occupies an 8-byte slot) → 2Πd + 16 bytes
* ``kivi2`` / ``hack*`` (papers.md §1.3; codes packed 8/b per byte along channels, channel c in bits
  ``b*(c mod 8/b)`` of byte ``c // (8/b)``, little end first):

  =========  ===============  ===================================================================
  field      shape            dtype
  =========  ===============  ===================================================================
  k_codes    [Π, d·bk/8]      u8
  k_scale    [d]              bf16  (K per channel over the page's Π tokens)
  k_min      [d]              bf16
  k_sums     [Π, g]           u8 if (2^bk−1)·p ≤ 255 else u16   (k_sums[n, j] = Σ_{c∈chunk j} k′[n, c])
  v_codes    [Π, d·bv/8]      u8
  v_scale    [Π, g]           bf16  (V per token over channel chunks of p)
  v_min      [Π, g]           bf16
  v_sums     [d]              u8 if (2^bv−1)·Π ≤ 255 else u16   (v_sums[c] = Σ_n v′[n, c])
  =========  ===============  ===================================================================

  d=128, Π=64, hack2 → 5,376 B per head; d=64, Π=64 → 2,688 B; 8 heads d=128: Π=32 → 26,624 B per layer
  page, Π=128 → 77,824 B (sums become u16).

Padding. papers.md says "the page is padded to a multiple of 4Π bytes" [artifact], yet its own table gives
2,688 B per head for d=64, Π=64 (not a multiple of 256) and its SmolLM2 example pads the *layer* page
(3 × 2,688 = 8,064 → 8,192 B) only as an aside, using the unpadded 8,064 B for its headline numbers. So:
head pages are never padded beyond 8-byte alignment; with ``pad_pages=True`` the *layer* page (all KV heads)
is rounded up to a multiple of 4Π bytes. The default (``False``) reproduces the headline figures. For
d=128 the padding is a no-op (5,376 = 21·256, 3,328 = 26·128, 9,728 = 19·512 per head).

Wire tail (open block on the wire). For ``kivi2``/``hack*`` with ``tail_bits`` b ∈ {2, 4, 8} the n open
tokens are sent in the quantized layout above with Π replaced by n *rows* and bk = bv = b: K per channel over
the n tokens (one k_scale/k_min per channel), V per token over chunks of p (the page's ``v_chunk``). Sum
widths are those a full Π-token page of b bits would use (so decode can place the tail in a page slot of
that type as a closed partial page): u8 if (2^b−1)·p ≤ 255 (k_sums) and (2^b−1)·Π ≤ 255 (v_sums).
Default b = 4, i.e. the ``hack4`` layout. ``tail_bits=16`` sends the open block as BF16. For ``fp8`` the tail
is an fp8 partial page (n rows, one scale per head per tensor; ``tail_bits`` is not used); for ``bf16`` it is
BF16. All byte counts are per layer (all KV heads) unless a name says ``head``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "ALIGN",
    "FORMATS",
    "PAGE_SIZES",
    "TAIL_BITS",
    "FieldSpec",
    "PageFormat",
]

FORMATS: tuple[str, ...] = ("bf16", "fp8", "kivi2", "hack2", "hack4", "hack-k4v2", "hack2r", "hack4r", "hack-k4v2r")
PAGE_SIZES: tuple[int, ...] = (32, 64, 128)
TAIL_BITS: tuple[int, ...] = (2, 4, 8, 16)
ALIGN = 8  # every field starts at a multiple of this many bytes
BF16_BYTES = 2

_BITS: dict[str, tuple[int, int]] = {
    "bf16": (16, 16),
    "fp8": (8, 8),
    "kivi2": (2, 2),
    "hack2": (2, 2),
    "hack4": (4, 4),
    "hack-k4v2": (4, 2),
}
_CODE_FORMATS = frozenset({"kivi2", "hack2", "hack4", "hack-k4v2"})
# ``*r`` formats: the base format with each head's K rotated by a fixed orthogonal matrix (kvcodec/rotation.py)
_ROTATED = {"hack2r": "hack2", "hack4r": "hack4", "hack-k4v2r": "hack-k4v2"}


class FieldSpec(NamedTuple):
    """One field of a head page: byte offset and size, logical shape, element dtype (u8 | u16 | bf16)."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def _sum_dtype(max_sum: int) -> str:
    return "u8" if max_sum <= 255 else "u16"


_DTYPE_BYTES = {"u8": 1, "u16": 2, "bf16": BF16_BYTES}


def _place(fields: list[tuple[str, tuple[int, ...], str]]) -> dict[str, FieldSpec]:
    """Lay fields out in order, each at an ALIGN-aligned offset."""
    out: dict[str, FieldSpec] = {}
    off = 0
    for name, shape, dtype in fields:
        n = _DTYPE_BYTES[dtype]
        for s in shape:
            n *= s
        off = _align(off)
        out[name] = FieldSpec(off, n, shape, dtype)
        off += n
    return out


def _end(layout: Mapping[str, FieldSpec]) -> int:
    return _align(max((f.offset + f.nbytes for f in layout.values()), default=0))


@dataclass(frozen=True)
class PageFormat:
    """Layout of one KV page (Π tokens of one layer) in a given format; see the module docstring.

    ``v_chunk=0`` means the default p = min(page_size, head_dim), or gcd(page_size, head_dim) when that does not
    divide head_dim (e.g. d=80: p=16, a power of two); after construction the field holds the resolved value.
    """

    format: str
    num_kv_heads: int
    head_dim: int
    page_size: int = 64
    v_chunk: int = 0
    num_sinks: int = 4
    tail_bits: int = 4
    pad_pages: bool = False
    meta_dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format: unknown KV format {self.format!r}; expected one of {FORMATS}")
        if self.page_size not in PAGE_SIZES:
            raise ValueError(f"page_size: {self.page_size} not in {PAGE_SIZES}")
        if self.num_kv_heads < 1:
            raise ValueError(f"num_kv_heads: must be >= 1, got {self.num_kv_heads}")
        if self.head_dim < 8 or self.head_dim % 8:
            raise ValueError(f"head_dim: must be a positive multiple of 8, got {self.head_dim}")
        if self.v_chunk == 0:
            p = min(self.page_size, self.head_dim)
            object.__setattr__(
                self, "v_chunk", p if self.head_dim % p == 0 else math.gcd(self.page_size, self.head_dim)
            )
        if self.v_chunk < 1 or self.head_dim % self.v_chunk:
            raise ValueError(f"v_chunk: {self.v_chunk} must be positive and divide head_dim={self.head_dim}")
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks: must be >= 0, got {self.num_sinks}")
        if self.tail_bits not in TAIL_BITS:
            raise ValueError(f"tail_bits: {self.tail_bits} not in {TAIL_BITS}")
        if self.meta_dtype != "bf16":
            raise ValueError(f"meta_dtype: only 'bf16' is supported, got {self.meta_dtype!r}")

    # ---- bits and dtypes -------------------------------------------------------------------------------
    @property
    def base_format(self) -> str:
        """The format without K rotation (``hack2r`` -> ``hack2``): same layout, bits and bytes."""
        return _ROTATED.get(self.format, self.format)

    @property
    def k_rotation(self) -> str:
        """Fixed orthogonal rotation of post-RoPE K (and q) before quantization: ``none`` | ``hadamard``
        (power-of-two head_dim) | ``random`` (seeded; other head_dim). See kvcodec/rotation.py."""
        if self.format not in _ROTATED:
            return "none"
        return "hadamard" if self.head_dim & (self.head_dim - 1) == 0 else "random"

    @property
    def bits_k(self) -> int:
        return _BITS[self.base_format][0]

    @property
    def bits_v(self) -> int:
        return _BITS[self.base_format][1]

    @property
    def is_quantized(self) -> bool:
        return self.format != "bf16"

    @property
    def has_code_sums(self) -> bool:
        """True for the asymmetric-code formats (kivi2, hack*): pages carry scale/min and code sums."""
        return self.base_format in _CODE_FORMATS

    @property
    def computes_on_codes(self) -> bool:
        """True when decode attention runs on the codes (hack*); kivi2 dequantizes inside the kernel."""
        return self.format.startswith("hack")

    @property
    def meta_bytes(self) -> int:
        return BF16_BYTES

    @property
    def k_sums_dtype(self) -> str | None:
        """u8 if (2^bk−1)·p ≤ 255 else u16; None for formats without sums."""
        if not self.has_code_sums:
            return None
        return _sum_dtype(((1 << self.bits_k) - 1) * self.v_chunk)

    @property
    def v_sums_dtype(self) -> str | None:
        """u8 if (2^bv−1)·Π ≤ 255 else u16; None for formats without sums."""
        if not self.has_code_sums:
            return None
        return _sum_dtype(((1 << self.bits_v) - 1) * self.page_size)

    # ---- one head's page -------------------------------------------------------------------------------
    def _code_layout(self, rows: int, bk: int, bv: int, ks_dtype: str, vs_dtype: str) -> dict[str, FieldSpec]:
        d, g = self.head_dim, self.head_dim // self.v_chunk
        return _place(
            [
                ("k_codes", (rows, d * bk // 8), "u8"),
                ("k_scale", (d,), "bf16"),
                ("k_min", (d,), "bf16"),
                ("k_sums", (rows, g), ks_dtype),
                ("v_codes", (rows, d * bv // 8), "u8"),
                ("v_scale", (rows, g), "bf16"),
                ("v_min", (rows, g), "bf16"),
                ("v_sums", (d,), vs_dtype),
            ]
        )

    def _fp8_layout(self, rows: int) -> dict[str, FieldSpec]:
        d = self.head_dim
        return _place(
            [
                ("k_codes", (rows, d), "u8"),
                ("k_scale", (1,), "bf16"),
                ("v_codes", (rows, d), "u8"),
                ("v_scale", (1,), "bf16"),
            ]
        )

    def _bf16_layout(self, rows: int) -> dict[str, FieldSpec]:
        return _place([("k", (rows, self.head_dim), "bf16"), ("v", (rows, self.head_dim), "bf16")])

    def field_layout(self) -> dict[str, FieldSpec]:
        """Ordered field name → FieldSpec(offset, nbytes, shape, dtype) within one KV head's page."""
        if self.base_format == "bf16":
            return self._bf16_layout(self.page_size)
        if self.base_format == "fp8":
            return self._fp8_layout(self.page_size)
        ks, vs = self.k_sums_dtype, self.v_sums_dtype
        assert ks is not None and vs is not None
        return self._code_layout(self.page_size, self.bits_k, self.bits_v, ks, vs)

    def field_offsets(self) -> dict[str, tuple[int, int]]:
        """Ordered field name → (offset, nbytes) within one KV head's page."""
        return {name: (f.offset, f.nbytes) for name, f in self.field_layout().items()}

    @property
    def head_page_bytes(self) -> int:
        """Bytes of one KV head's page (fields 8-byte aligned; no 4Π padding, see module docstring)."""
        return _end(self.field_layout())

    @property
    def layer_page_bytes(self) -> int:
        """Bytes of one page for all KV heads of a layer (heads back to back; 4Π-padded if pad_pages)."""
        n = self.num_kv_heads * self.head_page_bytes
        return _align(n, 4 * self.page_size) if self.pad_pages else n

    @property
    def bf16_bytes_per_token(self) -> int:
        """BF16 K+V bytes per token per layer: 2·H·d·2."""
        return 2 * self.num_kv_heads * self.head_dim * BF16_BYTES

    @property
    def bytes_per_token_steady(self) -> float:
        """Bytes per token per layer counting closed pages only: layer_page_bytes / Π."""
        return self.layer_page_bytes / self.page_size

    # ---- open block / wire tail -------------------------------------------------------------------------
    def tail_field_layout(self, n_tokens: int) -> dict[str, FieldSpec]:
        """Field layout of one KV head's compact wire tail of ``n_tokens`` (1 ≤ n < Π) open tokens."""
        if not 0 < n_tokens < self.page_size:
            raise ValueError(f"n_tokens: open block has 1..{self.page_size - 1} tokens, got {n_tokens}")
        if self.format == "bf16" or (self.has_code_sums and self.tail_bits == 16):
            return self._bf16_layout(n_tokens)
        if self.format == "fp8":
            return self._fp8_layout(n_tokens)
        b = self.tail_bits
        top = (1 << b) - 1
        return self._code_layout(n_tokens, b, b, _sum_dtype(top * self.v_chunk), _sum_dtype(top * self.page_size))

    def tail_bytes(self, n_tokens: int) -> int:
        """Wire bytes of an open block of ``n_tokens`` (0 ≤ n < Π) for all KV heads of one layer."""
        if n_tokens == 0:
            return 0
        return self.num_kv_heads * _end(self.tail_field_layout(n_tokens))

    # ---- whole requests ---------------------------------------------------------------------------------
    def split_tokens(self, num_tokens: int) -> tuple[int, int, int]:
        """(sinks, closed pages, open tokens) for a sequence of ``num_tokens``."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens: must be >= 0, got {num_tokens}")
        sinks = min(num_tokens, self.num_sinks)
        pages, open_tokens = divmod(num_tokens - sinks, self.page_size)
        return sinks, pages, open_tokens

    def request_bytes(self, num_tokens: int, num_layers: int, wire: bool) -> int:
        """KV bytes of a ``num_tokens`` prompt over ``num_layers`` layers.

        BF16 sinks + closed pages + the open block: BF16 (decode cache, ``wire=False``) or the compact
        tail (``wire=True``).
        """
        if num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {num_layers}")
        sinks, pages, open_tokens = self.split_tokens(num_tokens)
        open_bytes = self.tail_bytes(open_tokens) if wire else open_tokens * self.bf16_bytes_per_token
        per_layer = sinks * self.bf16_bytes_per_token + pages * self.layer_page_bytes + open_bytes
        return num_layers * per_layer

    def bf16_request_bytes(self, num_tokens: int, num_layers: int) -> int:
        """BF16 KV bytes of a ``num_tokens`` prompt over ``num_layers`` layers (the ratio denominator)."""
        if num_tokens < 0 or num_layers < 1:
            raise ValueError(f"num_tokens/num_layers: bad values {num_tokens}, {num_layers}")
        return num_tokens * num_layers * self.bf16_bytes_per_token
