"""Prefill role + decode role (KV handed over layer by layer) equals a single engine."""

from __future__ import annotations

import pytest
import torch

from stageserve.engine import KVCacheFullError, SamplingParams
from tests.conftest import PROMPTS


def _run_to_end(engine, rid: str) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    reason = None
    while engine.has_unfinished_requests():
        for event in engine.step():
            if event.request_id == rid:
                tokens += event.token_ids
                reason = event.finish_reason or reason
    return tokens, reason


@pytest.mark.parametrize("prompt", [PROMPTS[1], PROMPTS[4]], ids=["short", "long"])
def test_prefill_then_decode_equals_single_engine(make_llm, prompt):
    single = make_llm(num_kv_blocks=256)
    prefill = make_llm(num_kv_blocks=256, role="prefill", max_num_batched_tokens=32)  # forces chunked prefill
    decode = make_llm(num_kv_blocks=256, role="decode")
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ids = single.encode(prompt)
    expected = single.generate([ids], params)[0].outputs[0].token_ids

    calls: list[tuple[int, int, int]] = []
    decode.engine.begin_import("r1", ids, params)

    def sink(layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        calls.append((layer, start, k.shape[0]))
        decode.engine.import_kv("r1", layer, start, k, v)

    prefill.engine.add_request("r1", ids, params, kv_sink=sink)
    first, reason = _run_to_end(prefill.engine, "r1")
    assert reason == "prefilled" and len(first) == 1
    num_layers = decode.engine.model_config.num_hidden_layers
    # every layer of every prompt position was handed over exactly once, in layer order within each chunk
    for layer in range(num_layers):
        rows = sorted((s, n) for lyr, s, n in calls if lyr == layer)
        assert sum(n for _, n in rows) == len(ids)
        assert rows[0][0] == 0
    if len(ids) > 32:
        assert len(calls) == num_layers * -(-len(ids) // 32)  # one call per layer per chunk, as produced
    decode.engine.commit_import("r1", first[0])
    rest, reason = _run_to_end(decode.engine, "r1")
    assert reason == "length"
    assert rest == expected
    assert decode.engine.blocks.usage == 0.0


def test_prefill_role_exports_cached_prefix_too(make_llm):
    prefill = make_llm(num_kv_blocks=128, block_size=8, role="prefill")
    params = SamplingParams(max_tokens=4)
    ids = prefill.encode(PROMPTS[4])
    for rid in ("a", "b"):
        got: dict[int, int] = {}

        def sink(layer, start, k, v, got=got):
            got[layer] = got.get(layer, 0) + k.shape[0]

        prefill.engine.add_request(rid, ids, params, kv_sink=sink)
        _run_to_end(prefill.engine, rid)
        assert set(got.values()) == {len(ids)}
    assert prefill.engine.blocks.prefix_hit_tokens > 0  # "b" hit the cache and still exported everything


def test_decode_import_when_cache_full_is_a_clear_error(make_llm):
    decode = make_llm(num_kv_blocks=2, block_size=8, role="decode")
    with pytest.raises(KVCacheFullError):
        decode.engine.begin_import("big", list(range(100, 140)), SamplingParams(max_tokens=4))
    assert decode.engine.blocks.num_free_blocks == 2


def test_import_rows_outside_prompt_rejected(make_llm):
    decode = make_llm(num_kv_blocks=16, block_size=8, role="decode")
    decode.engine.begin_import("r", list(range(100, 110)), SamplingParams(max_tokens=4))
    kv = torch.zeros(4, 3, 64)
    with pytest.raises(ValueError, match="outside the prompt"):
        decode.engine.import_kv("r", 0, 8, kv, kv)
    decode.engine.abort_request("r")
    assert decode.engine.blocks.num_free_blocks == 16
