"""Paged KV cache storage: one flat slot array per layer; slot = block_id * block_size + offset."""

from __future__ import annotations

import torch


class PagedKVCache:
    """K and V of every layer: ``k[layer]`` and ``v[layer]`` are [num_slots, num_kv_heads, head_dim].

    With ``head_dims`` (one (K dim, V dim) per layer, e.g. a ZeroC model's ranks) ``k``/``v`` are lists of
    per-layer tensors [num_slots, num_kv_heads, dim] sized exactly; indexing by layer works the same.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        storage_dtype: torch.dtype | None = None,
        head_dims: list[tuple[int, int]] | None = None,
    ) -> None:
        """``storage_dtype`` (e.g. bf16) rounds every written value through it, whatever ``dtype`` holds it."""
        self.storage_dtype = storage_dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.num_layers = num_layers
        slots = num_blocks * block_size
        self.k: torch.Tensor | list[torch.Tensor]
        self.v: torch.Tensor | list[torch.Tensor]
        if head_dims is None or all(d == (head_dim, head_dim) for d in head_dims):
            shape = (num_layers, slots, num_kv_heads, head_dim)
            self.k = torch.zeros(shape, dtype=dtype)
            self.v = torch.zeros(shape, dtype=dtype)
        else:
            if len(head_dims) != num_layers:
                raise ValueError(f"head_dims: {len(head_dims)} entries for {num_layers} layers")
            self.k = [torch.zeros(slots, num_kv_heads, dk, dtype=dtype) for dk, _ in head_dims]
            self.v = [torch.zeros(slots, num_kv_heads, dv, dtype=dtype) for _, dv in head_dims]

    @staticmethod
    def bytes_per_block(
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        head_dims: list[tuple[int, int]] | None = None,
    ) -> int:
        per_token = sum(dk + dv for dk, dv in head_dims) if head_dims else 2 * num_layers * head_dim
        return per_token * block_size * num_kv_heads * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.storage_dtype is not None:
            k, v = k.to(self.storage_dtype), v.to(self.storage_dtype)
        self.k[layer].index_copy_(0, slots, k.to(self.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.dtype))

    def slots_for(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot indices of token positions [start, end) of a sequence with this block table."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size
