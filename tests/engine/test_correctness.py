"""The engine against transformers on the same weights (fp32), and against itself under batching,
prefix caching and preemption."""

from __future__ import annotations

import pytest
import torch

from stageserve.engine import SamplingParams
from tests.conftest import PROMPTS

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def _hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def test_first_forward_logits_match_transformers(llm, hf_model):
    ids = llm.encode(PROMPTS[3])
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
        from stageserve.engine.attention import NoCacheAttention

        model = llm.engine.loaded.model
        ours = model.logits(model(torch.tensor(ids), torch.arange(len(ids)), NoCacheAttention()))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-3


def test_paged_prefill_logits_match_transformers(llm, hf_model):
    """The last-token logits through the paged cache and chunked prefill equal transformers'."""
    from stageserve.policy.batching.scheduler import ScheduledSeq
    from stageserve.policy.batching.sequence import Sequence

    ids = llm.encode(PROMPTS[4])
    engine = llm.engine
    seq = Sequence("logits-check", list(ids), len(ids), GREEDY, 0.0)
    assert engine.blocks.allocate(seq.block_table, len(ids))
    try:
        first = engine.runner.execute([ScheduledSeq(seq, 40)], {}, {})
        assert first.shape[0] == 0  # an unfinished chunk samples nothing
        seq.num_computed_tokens = 40
        last = engine.runner.execute([ScheduledSeq(seq, len(ids) - 40)], {}, {})
    finally:
        engine.blocks.free(seq.block_table)
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0, -1].float()
    assert (last[0] - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"len{len(p)}" for p in PROMPTS])
def test_greedy_continuation_equals_transformers(llm, hf_model, prompt):
    ids = llm.encode(prompt)
    ours = llm.generate([ids], GREEDY)[0].outputs[0].token_ids
    assert ours == _hf_greedy(hf_model, ids, GREEDY.max_tokens)


def test_batched_mixed_lengths_equal_one_at_a_time(make_llm):
    llm = make_llm(num_kv_blocks=512, max_num_batched_tokens=64, enable_prefix_caching=False)
    params = [SamplingParams(max_tokens=8 + 4 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    batched = llm.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, batched, strict=True):
        alone = llm.generate(prompt, p)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == p.max_tokens
        assert out.outputs[0].finish_reason == "length"


def test_prefix_cache_hit_leaves_output_unchanged(make_llm):
    llm = make_llm(num_kv_blocks=256, block_size=8)
    shared = PROMPTS[4]
    first = llm.generate(shared + " Once upon a time", GREEDY)[0]
    second = llm.generate(shared + " Once upon a time", GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 8 * ((len(llm.encode(shared)) - 1) // 8) - 8
    assert second.num_cached_tokens > 0
    uncached = make_llm(num_kv_blocks=256, block_size=8, enable_prefix_caching=False)
    reference = uncached.generate(shared + " Once upon a time", GREEDY)[0]
    assert second.outputs[0].token_ids == first.outputs[0].token_ids == reference.outputs[0].token_ids


def test_preemption_leaves_outputs_unchanged(make_llm):
    roomy = make_llm(num_kv_blocks=512, enable_prefix_caching=False)
    tight = make_llm(num_kv_blocks=20, block_size=8, enable_prefix_caching=False)
    prompts = PROMPTS[1:4] + [PROMPTS[3][:80]]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.num_preemptions > 0
    assert got == expected
    assert tight.engine.blocks.num_free_blocks == 20  # everything returned


def test_bfloat16_agrees_until_first_near_tie(loaded, llm, hf_model):
    """bf16 may legitimately diverge at near-tied logits; up to the first small-margin step it must agree."""
    from stageserve.engine import LLM
    from stageserve.models import load_model

    bf16 = LLM(loaded=load_model(dtype=torch.bfloat16), dtype="bfloat16", num_kv_blocks=256)
    ids = llm.encode(PROMPTS[1])
    ref = llm.generate([ids], GREEDY)[0].outputs[0].token_ids
    got = bf16.generate([ids], GREEDY)[0].outputs[0].token_ids
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids + ref])).logits[0, len(ids) - 1 :].float()
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    safe = next((i for i, m in enumerate(margins) if m < 0.5), len(ref))
    assert safe > 0
    assert got[:safe] == ref[:safe]
