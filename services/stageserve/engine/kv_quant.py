"""Quantize-on-append for the decode cache: each page is quantized once, when it fills, never again.

Layout per request (``PageFormat`` convention): sinks (tokens 0..S-1) and the open block stay BF16; closed
pages [S + jΠ, S + (j+1)Π) hold exactly what the page format stores (codes dequantized with their BF16
scales and mins), so attention over the cache equals attention on the codes with q̃ and p̃ kept in float
(the §1.4 identity). The dense cache keeps values, not packed codes: this is the accuracy path; the bytes
are what ``kvcodec.wire`` sends and ``PageFormat`` sizes. On the decode side of a transfer the prompt's
pages and its tail arrive closed; pages then start at the prompt's end.
"""

from __future__ import annotations

import torch

from stageserve.engine.kv_cache import PagedKVCache
from stageserve.kvcodec.format import PageFormat
from stageserve.kvcodec.rotation import format_roundtrip


class PageCloser:
    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache

    @torch.inference_mode()
    def close_ready(self, fmt: PageFormat, block_table: list[int], num_computed: int, closed_upto: int) -> int:
        """Quantizes every page that is complete in ``[closed_upto, num_computed)``; returns the new
        ``closed_upto`` (the start of the open block)."""
        start = max(closed_upto, fmt.num_sinks)
        while start + fmt.page_size <= num_computed:
            slots = self.cache.slots_for(block_table, start, start + fmt.page_size)
            for layer in range(len(self.cache.k)):
                k = self.cache.k[layer][slots].transpose(0, 1)  # [H, Π, D]
                v = self.cache.v[layer][slots].transpose(0, 1)
                k_hat, v_hat = format_roundtrip(fmt, k, v)
                self.cache.write(layer, slots, k_hat.transpose(0, 1), v_hat.transpose(0, 1))
            start += fmt.page_size
        return start

