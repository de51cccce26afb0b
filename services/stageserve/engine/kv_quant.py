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
from stageserve.kvcodec.reference import roundtrip_page


class PageCloser:
    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache

    @torch.inference_mode()
    def close_ready(self, fmt: PageFormat, block_table: list[int], num_computed: int, closed_upto: int) -> int:
        """Quantizes every page that is complete in ``[closed_upto, num_computed)``; returns the new
        ``closed_upto`` (the start of the open block)."""
        start = max(closed_upto, fmt.num_sinks)
        bits = (fmt.bits_k, fmt.bits_v)
        while start + fmt.page_size <= num_computed:
            slots = self.cache.slots_for(block_table, start, start + fmt.page_size)
            for layer in range(len(self.cache.k)):
                k = self.cache.k[layer][slots].transpose(0, 1)  # [H, Π, D]
                v = self.cache.v[layer][slots].transpose(0, 1)
                k_hat, v_hat = roundtrip_page(k, v, fmt.format, bits, _v_chunk(fmt, v.shape[-1]))
                self.cache.write(layer, slots, k_hat.transpose(0, 1), v_hat.transpose(0, 1))
            start += fmt.page_size
        return start


def _v_chunk(fmt: PageFormat, v_dim: int) -> int:
    """The format's V chunk for a layer whose V has ``v_dim`` values per head (ZeroC layers may have fewer)."""
    if v_dim == fmt.head_dim:
        return fmt.v_chunk
    return PageFormat(fmt.format, fmt.num_kv_heads, v_dim, page_size=fmt.page_size).v_chunk
