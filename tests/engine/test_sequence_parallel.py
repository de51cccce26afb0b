"""Ulysses sequence-parallel prefill over gloo (2 real processes) equals the single-process forward."""

from __future__ import annotations

import pytest
import torch

from stageserve.engine.sequence_parallel import analytic_bytes_per_token, head_groups, shard_bounds
from stageserve.tools.sp_prefill import run_sp, single_process, tiny_config, tiny_model


def test_shards_and_head_groups():
    assert shard_bounds(13, 2) == [(0, 7), (7, 13)]
    assert shard_bounds(4, 3) == [(0, 2), (2, 3), (3, 4)]
    groups = head_groups(6, 3, 2)  # uneven: KV heads {0,1} | {2}; query heads follow their KV head
    assert groups == [(slice(0, 4), slice(0, 2)), (slice(4, 6), slice(2, 3))]
    with pytest.raises(ValueError, match="KV heads"):
        head_groups(6, 3, 4)


def test_analytic_bytes_scale_with_rank():
    full = analytic_bytes_per_token(6, 3, [(16, 16)] * 2, 2, 4)
    assert full == (6 + 3) * 16 * 2 * 2 * 4 / 2
    assert analytic_bytes_per_token(6, 3, [(8, 8)] * 2, 2, 4) == full / 2


def _expected_bytes(t, hq, hkv, dims, world, elt=4):
    """Off-rank bytes of all four all-to-alls, from the shard and head split (uneven included)."""
    total = 0
    for (s, e), (qs, ks) in zip(shard_bounds(t, world), head_groups(hq, hkv, world), strict=True):
        n, q_mine, kv_mine = e - s, qs.stop - qs.start, ks.stop - ks.start
        for dk, dv in dims:
            total += n * ((hq - q_mine) * dk + (hkv - kv_mine) * (dk + dv)) + (t - n) * q_mine * dv
    return total * elt


def test_sp2_equals_single_process_with_compressed_exchanges():
    """N=2 gloo processes, 13 tokens (uneven shards), 3 KV heads (uneven head split), ZeroC ranks 8 of 16."""
    ids = [int(x) for x in torch.randint(0, 128, (13,), generator=torch.Generator().manual_seed(3))]
    res = run_sp({"model": "tiny", "seed": 0, "ranks": (8, 8)}, ids, 2)
    ref = single_process(tiny_model(0, (8, 8)), ids)
    torch.testing.assert_close(res.hidden, ref, rtol=1e-5, atol=1e-5)
    cfg = tiny_config()
    sent = sum(sum(b.values()) for b in res.bytes_by_rank)
    assert sent == _expected_bytes(13, cfg.num_attention_heads, cfg.num_key_value_heads, [(8, 8)] * 2, 2)
    full = _expected_bytes(13, cfg.num_attention_heads, cfg.num_key_value_heads, [(16, 16)] * 2, 2)
    assert sent * 2 == full
