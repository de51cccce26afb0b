"""Quantize-on-append for the decode cache: each page is quantized once, when it fills, never again.

Layout per request (``PageFormat`` convention): sinks (tokens 0..S-1) and the open block stay BF16; closed
pages [S + jΠ, S + (j+1)Π) hold exactly what the page format stores (codes dequantized with their BF16
scales and mins), so attention over the dense cache equals attention on the codes with q̃ and p̃ kept in
float (the §1.4 identity). On the decode side of a transfer the prompt's pages and its tail arrive closed;
pages then start at the prompt's end.

``kv_store="codes"`` (``EngineConfig``): for formats with codes (hack2, hack4, hack-k4v2, kivi2 and the
rotated ones) a closed page is also written, once, as packed codes into a ``CodePool`` (a
``kvcodec.paged.PagedCodeStore`` with a free list); the request records its code-page ids (``SeqCodes``) and
decode steps attend on the codes (``engine.attention``). The dense cache keeps the dequantized values too:
prefill chunks over earlier context (chunked prefill, recompute after preemption) read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stageserve.engine.kv_cache import PagedKVCache
from stageserve.kvcodec.format import PageFormat
from stageserve.kvcodec.paged import PagedCodeStore
from stageserve.kvcodec.rotation import format_roundtrip, rotate


@dataclass
class SeqCodes:
    """One request's closed pages in the code store: ``page_ids[j]`` holds positions [starts[j], starts[j] + Π)."""

    page_size: int
    page_ids: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)


class CodePool:
    """A ``PagedCodeStore`` for one format plus a free list of its page ids."""

    def __init__(self, fmt: PageFormat, num_layers: int, num_pages: int) -> None:
        self.store = PagedCodeStore.allocate(fmt, num_layers, num_pages)
        self.fmt = fmt
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"code store full: {n} pages wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, codes: SeqCodes) -> None:
        self._free.extend(reversed(codes.page_ids))
        codes.page_ids.clear()
        codes.starts.clear()


class PageCloser:
    def __init__(self, cache: PagedKVCache, pool: CodePool | None = None) -> None:
        self.cache = cache
        self.pool = pool

    @torch.inference_mode()
    def close_ready(
        self,
        fmt: PageFormat,
        block_table: list[int],
        num_computed: int,
        closed_upto: int,
        codes: SeqCodes | None = None,
    ) -> int:
        """Quantizes every page that is complete in ``[closed_upto, num_computed)``; returns the new
        ``closed_upto`` (the start of the open block). With ``codes`` (and a pool) the pages' codes are also
        stored and their ids appended to ``codes``."""
        start = max(closed_upto, fmt.num_sinks)
        starts = []
        while start + fmt.page_size <= num_computed:
            starts.append(start)
            start += fmt.page_size
        if not starts:
            return start
        slots = torch.cat([self.cache.slots_for(block_table, s, s + fmt.page_size) for s in starts])
        ids = self.pool.alloc(len(starts)) if codes is not None and self.pool is not None else None
        n, h = len(starts), self.cache.k[0].shape[1]
        for layer in range(len(self.cache.k)):
            k = self.cache.k[layer][slots]  # [nΠ, H, D]
            v = self.cache.v[layer][slots]
            if ids is not None:
                kp = rotate(k.reshape(n, fmt.page_size, h, -1), fmt.k_rotation)
                self.pool.store.write_pages(layer, ids, kp, v.reshape(n, fmt.page_size, h, -1))
            kt = k.reshape(n, fmt.page_size, h, -1).transpose(1, 2)  # [N, H, Π, D]
            vt = v.reshape(n, fmt.page_size, h, -1).transpose(1, 2)
            k_hat, v_hat = format_roundtrip(fmt, kt, vt)
            k_hat, v_hat = k_hat.transpose(1, 2).reshape(k.shape), v_hat.transpose(1, 2).reshape(v.shape)
            self.cache.write(layer, slots, k_hat, v_hat)
        if ids is not None:
            codes.page_ids.extend(ids)
            codes.starts.extend(starts)
        return start
