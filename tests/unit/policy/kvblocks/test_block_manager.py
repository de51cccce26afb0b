"""BlockManager: all-or-nothing allocation, ref counts, prefix hashing and LRU eviction (pure)."""

from __future__ import annotations

import pytest

from stageserve.policy.kvblocks.block_manager import BlockManager, hash_block


def _committed(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Allocates a table for ``tokens``, marks all of them computed and commits the full blocks."""
    table: list[int] = []
    assert bm.allocate(table, len(tokens))
    bm.commit_full_blocks(table, tokens, len(tokens))
    return table


# ---- construction / queries ---------------------------------------------------------------------
@pytest.mark.parametrize("num_blocks,block_size", [(0, 4), (4, 0), (-1, 4)])
def test_rejects_non_positive_sizes(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_blocks_needed_rounds_up_and_accounts_for_held_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.blocks_needed([], 0) == 0
    assert bm.blocks_needed([], 1) == 1
    assert bm.blocks_needed([], 4) == 1
    assert bm.blocks_needed([], 5) == 2
    assert bm.blocks_needed([7], 5) == 1
    assert bm.blocks_needed([7, 6], 5) == 0
    assert bm.blocks_needed([7, 6, 5], 5) == 0  # never negative


# ---- allocation ---------------------------------------------------------------------------------
def test_allocate_grows_table_in_place_and_counts_usage() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.usage == 0.0
    assert bm.num_free_blocks == 4
    table: list[int] = []
    assert bm.allocate(table, 5) is True
    assert len(table) == 2
    assert len(set(table)) == 2
    assert bm.num_free_blocks == 2
    assert bm.usage == pytest.approx(0.5)
    assert all(bm.blocks[b].ref_count == 1 for b in table)
    # Growing within the open block needs nothing new.
    assert bm.allocate(table, 8) is True
    assert len(table) == 2
    assert bm.allocate(table, 9) is True
    assert len(table) == 3
    assert bm.usage == pytest.approx(0.75)


def test_allocate_is_all_or_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    first: list[int] = []
    assert bm.allocate(first, 8)  # 2 blocks
    second: list[int] = []
    assert bm.allocate(second, 4)  # 1 block; 1 left
    held = list(second)
    assert bm.allocate(second, 12) is False  # needs 2 more, only 1 free
    assert second == held
    assert bm.num_free_blocks == 1
    third: list[int] = []
    assert bm.allocate(third, 5) is False
    assert third == []
    assert bm.num_free_blocks == 1
    assert bm.usage == pytest.approx(0.75)
    # Exactly what is left still works.
    assert bm.allocate(second, 8) is True
    assert len(second) == 2
    assert bm.num_free_blocks == 0
    assert bm.usage == 1.0
    assert sorted(first + second) == [0, 1, 2, 3]


def test_free_returns_blocks_and_clears_table() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    table: list[int] = []
    assert bm.allocate(table, 6)
    held = list(table)
    bm.free(table)
    assert table == []
    assert bm.num_free_blocks == 4
    assert bm.usage == 0.0
    assert all(bm.blocks[b].ref_count == 0 for b in held)
    # Everything can be handed out again.
    again: list[int] = []
    assert bm.allocate(again, 8)
    assert sorted(again) == [0, 1, 2, 3]


def test_double_free_raises() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    table: list[int] = []
    assert bm.allocate(table, 2)
    copy = list(table)
    bm.free(table)
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(copy)


def test_lru_order_reuses_never_used_blocks_before_recently_freed() -> None:
    bm = BlockManager(num_blocks=4, block_size=1)
    a: list[int] = []
    assert bm.allocate(a, 2)
    assert a == [0, 1]
    bm.free(a)  # free order is now 2, 3, then the freed ones
    b: list[int] = []
    assert bm.allocate(b, 2)
    assert b == [2, 3]


# ---- prefix cache -------------------------------------------------------------------------------
def test_match_prefix_hits_full_committed_blocks_and_shares_them() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 110))  # 10 tokens: 2 full blocks + 2 in the open block
    owner = _committed(bm, tokens)
    assert len(owner) == 3
    matched = bm.match_prefix(tokens, max_tokens=len(tokens) - 1)
    assert matched == owner[:2]  # the open third block is never shared
    assert [bm.blocks[b].ref_count for b in owner] == [2, 2, 1]
    assert bm.prefix_hit_tokens == 8
    assert bm.prefix_query_tokens == 10
    # A third table shares them too.
    other = bm.match_prefix(tokens + [1, 2, 3], max_tokens=12)
    assert other == owner[:2]
    assert [bm.blocks[b].ref_count for b in owner] == [3, 3, 1]
    # Freeing one sharer keeps the blocks allocated for the others.
    free_before = bm.num_free_blocks
    bm.free(matched)
    assert [bm.blocks[b].ref_count for b in owner] == [2, 2, 1]
    assert bm.num_free_blocks == free_before


def test_uncommitted_or_partially_computed_blocks_do_not_match() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(12))
    table: list[int] = []
    assert bm.allocate(table, 12)
    assert bm.match_prefix(tokens, max_tokens=11) == []  # nothing committed yet
    bm.commit_full_blocks(table, tokens, 7)  # only block 0 is fully computed
    assert bm.match_prefix(tokens, max_tokens=11) == [table[0]]


def test_match_prefix_respects_max_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))  # exactly two full blocks
    owner = _committed(bm, tokens)
    # The caller must keep one token to compute: the whole prompt is never matched.
    assert bm.match_prefix(tokens, max_tokens=len(tokens) - 1) == [owner[0]]
    assert bm.match_prefix(tokens, max_tokens=8) == owner
    assert bm.match_prefix(tokens, max_tokens=3) == []
    assert bm.match_prefix(tokens, max_tokens=0) == []


def test_chained_hash_needs_matching_parent() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    _committed(bm, [1, 2, 3, 4, 5])
    # Same second block content but a different first block: no hit at all.
    assert bm.match_prefix([9, 9, 3, 4, 5], max_tokens=4) == []
    # Different second block: only the first matches.
    assert len(bm.match_prefix([1, 2, 9, 9, 5], max_tokens=4)) == 1
    assert hash_block(hash_block(None, [1, 2]), [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])


def test_identical_block_committed_twice_keeps_first_owner() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    first = _committed(bm, [1, 2, 3])
    second = _committed(bm, [1, 2, 3])  # computed independently; not shared
    assert first[0] != second[0]
    assert bm.blocks[second[0]].block_hash is None
    assert bm.match_prefix([1, 2, 3], max_tokens=2) == [first[0]]


def test_freed_cached_block_matches_until_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    owner: list[int] = []
    assert bm.allocate(owner, 4)
    assert owner == [0, 1]
    bm.commit_full_blocks(owner, tokens, 4)
    bm.free(owner)
    assert bm.num_free_blocks == 4
    assert bm.usage == 0.0

    # Still cached after free: a match revives the blocks (taking them off the free list).
    hit = bm.match_prefix(tokens, max_tokens=4)
    assert hit == [0, 1]
    assert bm.num_free_blocks == 2
    assert [bm.blocks[b].ref_count for b in hit] == [1, 1]
    bm.free(hit)

    # Allocating never-used blocks evicts nothing.
    fresh: list[int] = []
    assert bm.allocate(fresh, 4)
    assert fresh == [2, 3]
    assert bm.match_prefix(tokens, max_tokens=4) == [0, 1]
    bm.free([0, 1])

    # The tail block was freed first, so it is evicted first; the chain stops there.
    evict_one: list[int] = []
    assert bm.allocate(evict_one, 1)
    assert evict_one == [1]
    assert bm.blocks[1].block_hash is None
    assert bm.match_prefix(tokens, max_tokens=4) == [0]
    bm.free([0])

    # Reusing the root block leaves nothing to match.
    evict_two: list[int] = []
    assert bm.allocate(evict_two, 1)
    assert evict_two == [0]
    assert bm.match_prefix(tokens, max_tokens=4) == []


def test_reallocated_block_can_be_recommitted_with_new_content() -> None:
    bm = BlockManager(num_blocks=1, block_size=2)
    table = _committed(bm, [1, 2])
    bm.free(table)
    table = _committed(bm, [7, 8])  # evicts [1, 2]
    assert bm.match_prefix([1, 2, 0], max_tokens=2) == []
    bm.free(table)
    assert bm.match_prefix([7, 8, 0], max_tokens=2) == [0]


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    tokens = [1, 2, 3, 4, 5]
    table = _committed(bm, tokens)
    assert all(bm.blocks[b].block_hash is None for b in table)
    assert bm.match_prefix(tokens, max_tokens=4) == []
    assert [bm.blocks[b].ref_count for b in table] == [1, 1, 1]
    assert bm.prefix_query_tokens == 5
    assert bm.prefix_hit_tokens == 0
