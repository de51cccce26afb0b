"""Paged KV cache storage: one flat slot array per layer; slot = block_id * block_size + offset."""

from __future__ import annotations

import torch


class PagedKVCache:
    """K and V of every layer: ``k[layer]`` and ``v[layer]`` are [num_slots, num_kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        """``storage_dtype`` (e.g. bf16) rounds every written value through it, whatever ``dtype`` holds it."""
        self.storage_dtype = storage_dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.storage_dtype is not None:
            k, v = k.to(self.storage_dtype), v.to(self.storage_dtype)
        self.k[layer].index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v.dtype))

    def slots_for(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot indices of token positions [start, end) of a sequence with this block table."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size
