"""Paged KV block manager with reference counts and prefix hashing (pure; no torch).

What it does: hands out fixed-size KV blocks (``block_size`` token slots each) to sequences, shares
full blocks between sequences whose token prefixes are identical, and recycles freed blocks in LRU
order while keeping their contents findable until they are actually reused.

Unit: one block of ``block_size`` tokens. A block's identity for prefix reuse is a chained hash of
(parent block hash, the block's token ids), so a hit on block i implies a hit on blocks 0..i-1.

Trade-offs: only *full* blocks are shared (the open last block is always private), which keeps
copy-on-write out of the engine; a free-but-cached block is evicted only when a fresh block is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = int


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained content hash of one full block."""
    return hash((parent, tuple(token_ids)))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockManager:
    """Allocates KV blocks to block tables (lists of block ids owned by the caller's sequences)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in LRU order (oldest first); a free block may still hold a cached hash.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one sequence (vLLM's kv_cache_usage_perc)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, block_table: Sequence[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    # ---- prefix cache --------------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Takes a reference on the longest run of cached full blocks that prefixes ``token_ids``.

        At most ``max_tokens`` tokens are matched (the caller keeps at least one token to compute).
        Returns the matched block ids, to become the start of the sequence's block table.
        """
        self.prefix_query_tokens += len(token_ids)
        if not self.enable_prefix_caching:
            return []
        matched: list[int] = []
        parent: BlockHash | None = None
        for start in range(0, max_tokens - self.block_size + 1, self.block_size):
            parent = hash_block(parent, token_ids[start : start + self.block_size])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            self._ref(block_id)
            matched.append(block_id)
        self.prefix_hit_tokens += len(matched) * self.block_size
        return matched

    def commit_full_blocks(self, block_table: Sequence[int], token_ids: Sequence[int], num_computed: int) -> None:
        """Registers the hashes of blocks whose every token now has its KV computed."""
        if not self.enable_prefix_caching:
            return
        parent: BlockHash | None = None
        for index in range(num_computed // self.block_size):
            start = index * self.block_size
            parent = hash_block(parent, token_ids[start : start + self.block_size])
            block = self.blocks[block_table[index]]
            if block.block_hash is None:
                if parent in self._cached:
                    continue  # an identical block exists already; keep ours private
                block.block_hash = parent
                self._cached[parent] = block.block_id

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grows ``block_table`` in place to hold ``num_tokens`` slots; all or nothing."""
        needed = self.blocks_needed(block_table, num_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict the stale cached content
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            block_table.append(block_id)
        return True

    def free(self, block_table: list[int]) -> None:
        """Drops the sequence's references; blocks reaching zero become reusable (newest last)."""
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed twice")
            if block.ref_count == 0:
                self._free[block_id] = None
        block_table.clear()

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1
