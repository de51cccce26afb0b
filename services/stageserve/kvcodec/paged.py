"""Paged store of quantized KV pages for the decode cache, and decode attention computed on the codes (torch).

This is the CPU serving path and the oracle the Triton kernels (``stageserve_kernels``) are tested against.

Store layout (``PagedCodeStore``; formats with code sums: ``hack2``, ``hack4``, ``hack-k4v2``, ``kivi2``)
-----------------------------------------------------------------------------------------------------
One tensor per ``PageFormat`` field, indexed ``[layer, page_id, kv_head, ...]`` (page_id = physical page,
0 .. num_pages-1); Π = page_size, d = head_dim, p = v_chunk, g = d/p, bk/bv = bits::

    k_codes  [L, P, H, Π, d*bk/8] uint8   packed along channels (reference.pack_codes)
    k_scale  [L, P, H, d]         bf16    K per channel over the page's Π tokens
    k_min    [L, P, H, d]         bf16
    k_sums   [L, P, H, Π, g]      uint8 (format says u8) or int16 (u16)
    v_codes  [L, P, H, Π, d*bv/8] uint8
    v_scale  [L, P, H, Π, g]      bf16    V per token over channel chunks of p
    v_min    [L, P, H, Π, g]      bf16
    v_sums   [L, P, H, d]         uint8 or int16

A page is quantized once (``write_pages`` / ``write_page``, on the token-major rows [Π, H, d] of a full
block) or installed from wire bytes (``install_page``: the exact bytes ``kvcodec.wire.pack`` produced for a
page span; nothing is re-quantized) and never rewritten.

Rotated formats (``hack2r``, ...): the store is rotation-agnostic. Pages hold codes of the rotated K (rotate K
before ``write_pages``, as the wire does before packing) and the caller passes q rotated the same way.

Where the BF16 parts live: the sinks (tokens 0..S-1) and the open block are *not* in this store. The caller
keeps them dense (e.g. in the engine's BF16 ``PagedKVCache``) and passes them to the attention function as
padded tensors with a length per sequence. Any BF16 rows may go there (after a prefill→decode transfer the
restored wire tail plus the new open block); attention is order-free once RoPE is applied.

Attention (``paged_decode_attention_torch``): one query per sequence, GQA (Hq = G·Hkv). Each closed page is
one split: scores from the codes (q·scale ⊙ k_scale quantized to INT8 per channel chunk, integer dot with
the codes, corrections from k_sums, the INT8 min and β = q·k_min), then p = exp(s − page max), P·V from the
codes (p ⊙ v_scale quantized to INT8 per chunk over the page's tokens, corrections from v_sums and v_min).
Sinks and open rows form one dense BF16 split. All splits merge by log-sum-exp, i.e. the online softmax of
papers.md HACK §1.5. ``dequant_decode_attention_torch`` is the baseline: dequantize the pages, then float
attention over the same splits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stageserve.kvcodec.format import PageFormat
from stageserve.kvcodec.reference import QuantPage, _quantize, pack_codes

__all__ = [
    "PagedCodeStore",
    "check_decode_inputs",
    "dense_decode_attention_torch",
    "dequant_decode_attention_torch",
    "paged_decode_attention_torch",
    "quantize_pages",
    "unpack_codes_nd",
]

FIELDS = ("k_codes", "k_scale", "k_min", "k_sums", "v_codes", "v_scale", "v_min", "v_sums")
_SUM_DTYPES = {"u8": torch.uint8, "u16": torch.int16}
_WIRE_DTYPES = {"u8": torch.uint8, "u16": torch.uint16, "bf16": torch.bfloat16}


def unpack_codes_nd(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n_bytes] uint8 -> [..., n_bytes * 8/bits] uint8 codes (channel c in bits b*(c mod 8/b))."""
    per, top = 8 // bits, (1 << bits) - 1
    codes = torch.stack([(packed >> (bits * i)) & top for i in range(per)], -1)  # scalar shifts: vectorized
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def quantize_pages(k: torch.Tensor, v: torch.Tensor, bits_k: int, bits_v: int, v_chunk: int) -> dict[str, torch.Tensor]:
    """k, v [N, Π, H, d] (N full pages, token-major) -> store fields with leading dims [N, H].

    Same math as ``reference.quantize_page`` (the same ``_quantize``, s and m rounded to BF16 first), batched
    over pages and heads; ``tests/kvcodec/test_paged.py`` checks it equals quantize_page bit for bit."""
    n, rows, h, d = k.shape
    g = d // v_chunk
    kt = k.float().permute(0, 2, 1, 3)  # [N, H, Π, d]
    vt = v.float().permute(0, 2, 1, 3)
    k_codes, k_scale, k_min = _quantize(kt, 2, bits_k, None)  # per channel over the page's tokens
    v_codes, v_scale, v_min = _quantize(vt.reshape(n, h, rows, g, v_chunk), 4, bits_v, None)
    v_codes = v_codes.reshape(n, h, rows, d)
    return {
        "k_codes": pack_codes(k_codes.reshape(-1, d), bits_k).reshape(n, h, rows, -1),
        "k_scale": k_scale,
        "k_min": k_min,
        "k_sums": k_codes.to(torch.int32).reshape(n, h, rows, g, v_chunk).sum(-1),
        "v_codes": pack_codes(v_codes.reshape(-1, d), bits_v).reshape(n, h, rows, -1),
        "v_scale": v_scale,
        "v_min": v_min,
        "v_sums": v_codes.to(torch.int32).sum(2),
    }


@dataclass
class PagedCodeStore:
    """Quantized closed pages of every layer, indexed by physical page id (see the module docstring)."""

    fmt: PageFormat
    num_layers: int
    num_pages: int
    fields: dict[str, torch.Tensor]

    @classmethod
    def allocate(
        cls, fmt: PageFormat, num_layers: int, num_pages: int, device: torch.device | str = "cpu"
    ) -> PagedCodeStore:
        if not fmt.has_code_sums:
            raise ValueError(f"fmt: format {fmt.format!r} has no codes; the code store holds kivi2/hack* pages")
        if num_layers < 1 or num_pages < 1:
            raise ValueError(f"num_layers/num_pages: must be >= 1, got {num_layers}, {num_pages}")
        layout = fmt.field_layout()
        lead = (num_layers, num_pages, fmt.num_kv_heads)
        fields = {}
        for name in FIELDS:
            spec = layout[name]
            dtype = torch.bfloat16 if spec.dtype == "bf16" else _SUM_DTYPES.get(spec.dtype, torch.uint8)
            if name.endswith("codes"):
                dtype = torch.uint8
            fields[name] = torch.zeros(lead + spec.shape, dtype=dtype, device=device)
        return cls(fmt, num_layers, num_pages, fields)

    def __getattr__(self, name: str) -> torch.Tensor:
        fields = self.__dict__.get("fields")
        if fields is not None and name in fields:
            return fields[name]
        raise AttributeError(name)

    @property
    def device(self) -> torch.device:
        return self.fields["k_codes"].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def _check(self, layer: int, page_ids: torch.Tensor) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} not in [0, {self.num_layers})")
        if page_ids.numel() and (int(page_ids.min()) < 0 or int(page_ids.max()) >= self.num_pages):
            raise ValueError(f"page_ids: must lie in [0, {self.num_pages})")

    # ---- writing ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def write_pages(self, layer: int, page_ids: torch.Tensor | list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize N full pages once and store them: k, v [N, Π, H, d] (post-RoPE, any float dtype)."""
        ids = torch.as_tensor(page_ids, dtype=torch.long, device=self.device).reshape(-1)
        f = self.fmt
        want = (ids.numel(), f.page_size, f.num_kv_heads, f.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k/v: expected shape {want}, got {tuple(k.shape)} and {tuple(v.shape)}")
        self._check(layer, ids)
        q = quantize_pages(k.to(self.device), v.to(self.device), f.bits_k, f.bits_v, f.v_chunk)
        for name, t in q.items():
            self.fields[name][layer, ids] = t.to(self.fields[name].dtype)

    def write_page(self, layer: int, page_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize one full page once: k, v [Π, H, d]."""
        self.write_pages(layer, [page_id], k.unsqueeze(0), v.unsqueeze(0))

    @torch.inference_mode()
    def install_page(self, layer: int, page_id: int, payload: bytes | bytearray | memoryview | torch.Tensor) -> None:
        """Store one page's wire payload (``wire.pack`` of a ``page`` span: heads back to back, fields at
        ``PageFormat.field_layout`` offsets) as is; codes, scales and sums are copied, never re-quantized."""
        self._check(layer, torch.tensor([page_id]))
        layout = self.fmt.field_layout()
        head = self.fmt.head_page_bytes
        if isinstance(payload, torch.Tensor):
            raw = payload.reshape(-1).to(torch.uint8).cpu()
        else:
            raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        if raw.numel() != head * self.fmt.num_kv_heads:
            raise ValueError(f"payload: {raw.numel()} bytes, expected {head * self.fmt.num_kv_heads}")
        per_head = raw.reshape(self.fmt.num_kv_heads, head)
        for name in FIELDS:
            spec = layout[name]
            cols = per_head[:, spec.offset : spec.offset + spec.nbytes].contiguous()
            val = cols.view(_WIRE_DTYPES[spec.dtype]).reshape((self.fmt.num_kv_heads,) + spec.shape)
            if spec.dtype == "u16":
                val = val.to(torch.int32)
            self.fields[name][layer, page_id] = val.to(self.fields[name].dtype).to(self.device)

    def install_quant_pages(self, layer: int, page_id: int, heads: list[QuantPage]) -> None:
        """Store one page given as one ``reference.QuantPage`` per KV head (unpacked codes), unchanged."""
        if len(heads) != self.fmt.num_kv_heads:
            raise ValueError(f"heads: expected {self.fmt.num_kv_heads} QuantPages, got {len(heads)}")
        self._check(layer, torch.tensor([page_id]))
        f = self.fmt
        for h, qp in enumerate(heads):
            vals = {
                "k_codes": pack_codes(qp.k_codes, f.bits_k),
                "k_scale": qp.k_scale,
                "k_min": qp.k_min,
                "k_sums": qp.k_sums,
                "v_codes": pack_codes(qp.v_codes, f.bits_v),
                "v_scale": qp.v_scale,
                "v_min": qp.v_min,
                "v_sums": qp.v_sums,
            }
            for name, t in vals.items():
                self.fields[name][layer, page_id, h] = t.to(self.fields[name].dtype).to(self.device)

    # ---- reading ---------------------------------------------------------------------------------------
    def read_page(self, layer: int, page_id: int) -> list[QuantPage]:
        """The stored page as one ``QuantPage`` per KV head (codes unpacked, sums int32)."""
        f = self.fmt
        out = []
        for h in range(f.num_kv_heads):
            t = {name: self.fields[name][layer, page_id, h].cpu() for name in FIELDS}
            out.append(
                QuantPage(
                    unpack_codes_nd(t["k_codes"], f.bits_k),
                    t["k_scale"],
                    t["k_min"],
                    t["k_sums"].to(torch.int32),
                    unpack_codes_nd(t["v_codes"], f.bits_v),
                    t["v_scale"],
                    t["v_min"],
                    t["v_sums"].to(torch.int32),
                    f.v_chunk,
                )
            )
        return out

    def gather(self, layer: int, page_tables: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fields of the pages in ``page_tables`` [B, P] -> tensors with leading dims [B, P, H]."""
        return {name: t[layer][page_tables] for name, t in self.fields.items()}


# ---- attention -------------------------------------------------------------------------------------------
def _int8_quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 8-bit quantization along ``dim`` (same as reference._int8_quantize): x ≈ s·x' + m."""
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    return torch.round((x - lo) / scale).clamp(0, 255), scale, lo


@dataclass
class _Partial:
    """Softmax state of a set of splits: max m, denominator l [B, S, H, G] and accumulator acc [B, S, H, G, d]."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741
    acc: torch.Tensor


def check_decode_inputs(
    q: torch.Tensor,
    fmt: PageFormat,
    page_tables: torch.Tensor,
    num_pages: torch.Tensor,
    dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Shapes and lengths of a decode-attention call (shared with the Triton launchers); ValueError names the
    argument. ``dense`` = (sinks_k, sinks_v, sink_lens, open_k, open_v, open_lens)."""
    if q.dim() != 3 or q.shape[2] != fmt.head_dim or q.shape[1] % fmt.num_kv_heads:
        raise ValueError(f"q: expected [B, G*{fmt.num_kv_heads}, {fmt.head_dim}], got {tuple(q.shape)}")
    b = q.shape[0]
    if page_tables.dim() != 2 or page_tables.shape[0] != b:
        raise ValueError(f"page_tables: expected [{b}, max_pages], got {tuple(page_tables.shape)}")
    if num_pages.shape != (b,) or (num_pages < 0).any() or (num_pages > page_tables.shape[1]).any():
        raise ValueError(f"num_pages: expected [{b}] with 0 <= n <= {page_tables.shape[1]}")
    sinks_k, sinks_v, sink_lens, open_k, open_v, open_lens = dense
    for name, t, lens, lens_name in (
        ("sinks", sinks_k, sink_lens, "sink_lens"),
        ("open", open_k, open_lens, "open_lens"),
    ):
        if t.dim() != 4 or t.shape[0] != b or t.shape[2:] != (fmt.num_kv_heads, fmt.head_dim):
            raise ValueError(f"{name}_k: expected [{b}, n, {fmt.num_kv_heads}, {fmt.head_dim}], got {tuple(t.shape)}")
        if lens.shape != (b,) or (lens < 0).any() or (lens > t.shape[1]).any():
            raise ValueError(f"{lens_name}: expected [{b}] with 0 <= n <= {t.shape[1]}")
    if sinks_v.shape != sinks_k.shape:
        raise ValueError(f"sinks_v: shape {tuple(sinks_v.shape)} != sinks_k {tuple(sinks_k.shape)}")
    if open_v.shape != open_k.shape:
        raise ValueError(f"open_v: shape {tuple(open_v.shape)} != open_k {tuple(open_k.shape)}")
    total = sink_lens + open_lens + num_pages * fmt.page_size
    if (total == 0).any():
        raise ValueError("lengths: every sequence needs at least one token (sinks, pages or open rows)")


def _dense_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float) -> _Partial:
    """q [B, H, G, d]; k, v [B, n, H, d] with ``lens`` valid rows -> one split's state ([B, 1, H, G, ...])."""
    s = torch.einsum("bhgd,bnhd->bhgn", q, k.float()) * scale
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < lens[:, None]  # [B, n]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    part = _softmax_partial(s, lambda p: torch.einsum("bhgn,bnhd->bhgd", p, v.float()))
    return _Partial(part.m.unsqueeze(1), part.l.unsqueeze(1), part.acc.unsqueeze(1))


def _softmax_partial(s: torch.Tensor, pv) -> _Partial:
    """s [..., n] scores (−inf = masked) -> state with p = exp(s − max); ``pv(p)`` gives the values."""
    m = s.amax(-1)
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - safe.unsqueeze(-1))
    acc = pv(p)
    return _Partial(m, p.sum(-1), acc)


def _merge(parts: list[_Partial]) -> torch.Tensor:
    """Log-sum-exp merge of split states over the split axis (dim 1) -> [B, H, G, d]."""
    m = torch.cat([p.m for p in parts], 1)
    l = torch.cat([p.l for p in parts], 1)  # noqa: E741
    acc = torch.cat([p.acc for p in parts], 1)
    top = m.amax(1, keepdim=True)
    w = torch.where(torch.isfinite(m), torch.exp(m - top), torch.zeros_like(m))
    return (acc * w.unsqueeze(-1)).sum(1) / (l * w).sum(1).unsqueeze(-1)


def _page_mask(num_pages: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """[B, hi-lo] True where the page index is < num_pages (a real page of that sequence)."""
    return torch.arange(lo, hi, device=num_pages.device)[None, :] < num_pages[:, None]


def _codes_partial(q: torch.Tensor, f: dict[str, torch.Tensor], fmt: PageFormat, scale: float, int8: bool) -> _Partial:
    """Attention state of each page computed on the codes: q [B, H, G, d], fields [B, P, H, ...].

    One matmul per channel chunk (a python loop over d/p ≤ 4 chunks), batched over sequences, pages and heads;
    the code tiles are sliced, not copied, so the matmuls read them in place."""
    d, pc = fmt.head_dim, fmt.v_chunk
    chunks = [slice(c * pc, (c + 1) * pc) for c in range(d // pc)]
    kc = unpack_codes_nd(f["k_codes"], fmt.bits_k).float()  # [B, P, H, Π, d]
    vc = unpack_codes_nd(f["v_codes"], fmt.bits_v).float()
    qs = q.unsqueeze(1) * scale  # [B, 1, H, G, d]
    q_t = qs * f["k_scale"].float().unsqueeze(3)  # scale folding: [B, P, H, G, d]
    s = (qs * f["k_min"].float().unsqueeze(3)).sum(-1, keepdim=True)  # β = q·k_min: [B, P, H, G, 1]
    k_sums = f["k_sums"].float()  # [B, P, H, Π, g]
    for c, sl in enumerate(chunks):
        if int8:
            q_codes, s_q, m_q = _int8_quantize(q_t[..., sl], dim=-1)  # per query head and chunk
            dots = q_codes @ kc[..., sl].transpose(-1, -2)  # integer products: [B, P, H, G, Π]
            s = s + s_q * dots + m_q * k_sums[..., c].unsqueeze(-2)
        else:
            s = s + q_t[..., sl] @ kc[..., sl].transpose(-1, -2)
    v_scale, v_min, v_sums = f["v_scale"].float(), f["v_min"].float(), f["v_sums"].float()

    def pv(p: torch.Tensor) -> torch.Tensor:  # p [B, P, H, G, Π] -> [B, P, H, G, d]
        outs = []
        for c, sl in enumerate(chunks):
            p_t = p * v_scale[..., c].unsqueeze(-2)  # scale folding: [B, P, H, G, Π]
            mins = (p * v_min[..., c].unsqueeze(-2)).sum(-1, keepdim=True)
            if int8:
                p_codes, s_p, m_p = _int8_quantize(p_t, dim=-1)  # per chunk over the page's tokens
                out = s_p * (p_codes @ vc[..., sl]) + m_p * v_sums[..., sl].unsqueeze(-2)
            else:
                out = p_t @ vc[..., sl]
            outs.append(out + mins)
        return torch.cat(outs, -1)

    return _softmax_partial(s, pv)


def _dequant_partial(q: torch.Tensor, f: dict[str, torch.Tensor], fmt: PageFormat, scale: float) -> _Partial:
    """Attention state of each page after dequantizing it to float (the kivi2 / fused-dequant baseline)."""
    d, pc = fmt.head_dim, fmt.v_chunk
    gc = d // pc
    kc = unpack_codes_nd(f["k_codes"], fmt.bits_k).float()
    vc = unpack_codes_nd(f["v_codes"], fmt.bits_v).float()
    k = kc * f["k_scale"].float().unsqueeze(3) + f["k_min"].float().unsqueeze(3)  # [B, P, H, Π, d]
    vg = vc.reshape(*vc.shape[:-1], gc, pc)
    v = (vg * f["v_scale"].float().unsqueeze(-1) + f["v_min"].float().unsqueeze(-1)).reshape(vc.shape)
    s = torch.einsum("bhGd,bphnd->bphGn", q, k) * scale
    return _softmax_partial(s, lambda p: torch.einsum("bphGn,bphnd->bphGd", p, v))


def _paged(
    q: torch.Tensor,
    store: PagedCodeStore,
    layer: int,
    page_tables: torch.Tensor,
    num_pages: torch.Tensor,
    dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float | None,
    page_fn,
    pages_per_chunk: int,
) -> torch.Tensor:
    fmt = store.fmt
    if not 0 <= layer < store.num_layers:
        raise ValueError(f"layer: {layer} not in [0, {store.num_layers})")
    page_tables = page_tables.to(device=store.device, dtype=torch.long)
    num_pages = num_pages.to(device=store.device, dtype=torch.long)
    check_decode_inputs(q, fmt, page_tables, num_pages, dense)
    b, hq, d = q.shape
    h = fmt.num_kv_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.float().reshape(b, h, hq // h, d)
    sinks_k, sinks_v, sink_lens, open_k, open_v, open_lens = dense
    k_dense = torch.cat([sinks_k, open_k], 1)
    v_dense = torch.cat([sinks_v, open_v], 1)
    valid = torch.cat(
        [
            torch.arange(sinks_k.shape[1], device=q.device)[None] < sink_lens[:, None],
            torch.arange(open_k.shape[1], device=q.device)[None] < open_lens[:, None],
        ],
        1,
    )
    # one dense split: sinks and open rows (padded rows pushed to the end and masked by a count)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    k_dense = k_dense.gather(1, order[:, :, None, None].expand_as(k_dense))
    v_dense = v_dense.gather(1, order[:, :, None, None].expand_as(v_dense))
    parts = [_dense_partial(qg, k_dense, v_dense, valid.sum(1), scale)]
    max_pages = int(num_pages.max()) if b else 0
    for lo in range(0, max_pages, pages_per_chunk):
        hi = min(lo + pages_per_chunk, max_pages)
        table = page_tables[:, lo:hi]
        present = _page_mask(num_pages, lo, hi)
        table = torch.where(present, table, torch.zeros_like(table)).clamp(0, store.num_pages - 1)
        part = page_fn(qg, store.gather(layer, table), fmt, scale)
        gone = ~present[:, :, None, None]
        part.m = part.m.masked_fill(gone, float("-inf"))
        part.l = part.l.masked_fill(gone, 0.0)
        part.acc = part.acc.masked_fill(gone.unsqueeze(-1), 0.0)
        parts.append(part)
    return _merge(parts).reshape(b, hq, d)


def paged_decode_attention_torch(
    q: torch.Tensor,
    store: PagedCodeStore,
    layer: int,
    page_tables: torch.Tensor,
    num_pages: torch.Tensor,
    sinks_k: torch.Tensor,
    sinks_v: torch.Tensor,
    sink_lens: torch.Tensor,
    open_k: torch.Tensor,
    open_v: torch.Tensor,
    open_lens: torch.Tensor,
    scale: float | None = None,
    int8: bool = True,
    pages_per_chunk: int = 256,
) -> torch.Tensor:
    """One decode step for B sequences on the codes; returns [B, Hq, d] float32.

    q [B, Hq, d] (post-RoPE; Hq = G·Hkv); ``page_tables`` [B, max_pages] physical page ids of each sequence's
    closed pages (entries past ``num_pages`` [B] are ignored); ``sinks_k/v`` [B, S', Hkv, d] with
    ``sink_lens`` [B] valid rows; ``open_k/v`` [B, O, Hkv, d] with ``open_lens`` [B] valid rows (any BF16
    rows: open block, restored wire tail); ``scale`` defaults to 1/√d. ``int8=False`` keeps q̃ and p̃ in
    float (then it equals dequantize-then-attend up to float rounding). Pages are processed
    ``pages_per_chunk`` at a time (bounds memory; each page is its own split either way).

    Chunked prefill over cached pages uses the same call with one row per query token: repeat the sequence's
    page table and sinks per row, pass the chunk's BF16 rows (after any open-block rows) as ``open_k/v``,
    and give row i ``open_lens[i]`` = the rows it may see (causal). ``tests/kvcodec/test_paged.py`` checks it.
    """

    def fn(qg, f, fmt, sc):
        return _codes_partial(qg, f, fmt, sc, int8)

    dense = (sinks_k, sinks_v, sink_lens, open_k, open_v, open_lens)
    return _paged(q, store, layer, page_tables, num_pages, dense, scale, fn, pages_per_chunk)


def dequant_decode_attention_torch(
    q: torch.Tensor,
    store: PagedCodeStore,
    layer: int,
    page_tables: torch.Tensor,
    num_pages: torch.Tensor,
    sinks_k: torch.Tensor,
    sinks_v: torch.Tensor,
    sink_lens: torch.Tensor,
    open_k: torch.Tensor,
    open_v: torch.Tensor,
    open_lens: torch.Tensor,
    scale: float | None = None,
    pages_per_chunk: int = 256,
) -> torch.Tensor:
    """Same contract as ``paged_decode_attention_torch``, but each page is dequantized to float first
    (the kivi2 path and the fused-dequant baseline)."""
    dense = (sinks_k, sinks_v, sink_lens, open_k, open_v, open_lens)
    return _paged(q, store, layer, page_tables, num_pages, dense, scale, _dequant_partial, pages_per_chunk)


def dense_decode_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Float attention of q [B, Hq, d] over dense rows k, v [B, n, Hkv, d] with ``lens`` [B] valid rows."""
    b, hq, d = q.shape
    h = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    part = _dense_partial(q.float().reshape(b, h, hq // h, d), k, v, lens, scale)
    return _merge([part]).reshape(b, hq, d)
