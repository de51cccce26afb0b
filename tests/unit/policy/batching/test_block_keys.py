"""Prefix-cache keys of sequences with images: the image content replaces the placeholder ids."""

from __future__ import annotations

from stageserve.core.sampling import SamplingParams
from stageserve.policy.batching.sequence import Sequence
from stageserve.policy.kvblocks.block_manager import BlockManager


def _seq(rid: str, key: int | None) -> Sequence:
    ids = [5, 6, 7, 8] + [16] * 8 + [9, 10, 11, 12]
    seq = Sequence(rid, ids, len(ids), SamplingParams(max_tokens=1), 0.0)
    if key is not None:
        seq.image_spans = [(4, 8, key)]
    return seq


def test_text_keys_are_the_token_ids_and_image_keys_are_negative():
    assert _seq("t", None).block_keys == _seq("t", None).token_ids
    keys = _seq("a", 123).block_keys
    assert keys[:4] == [5, 6, 7, 8] and keys[12:] == [9, 10, 11, 12]
    assert all(k < 0 for k in keys[4:12]) and len(set(keys[4:12])) == 8


def test_same_positions_different_images_never_share_blocks():
    blocks = BlockManager(16, 4)
    a = _seq("a", 111)
    blocks.allocate(a.block_table, a.num_tokens)
    blocks.commit_full_blocks(a.block_table, a.block_keys, a.num_tokens)
    same = _seq("b", 111)
    other = _seq("c", 222)
    assert len(blocks.match_prefix(same.block_keys, same.num_tokens - 1)) == 3  # the same image: 3 full blocks
    assert len(blocks.match_prefix(other.block_keys, other.num_tokens - 1)) == 1  # only the text block before it
    assert len(blocks.match_prefix(_seq("d", None).block_keys, 15)) == 1  # placeholder ids alone never match
