"""Quantize-on-append KV formats in the engine: pages quantized once when they fill, never again; decode
steps over the quantized cache; perplexity ordering across formats."""

from __future__ import annotations

import pytest
import torch

from stageserve.engine import SamplingParams
from stageserve.tools.eval_ppl import corpus_tokens, perplexity, perplexity_by_decode_steps, windows
from tests.conftest import DATA

WIKITEXT = str(DATA / "wikitext2" / "test.txt")


def test_decode_step_scoring_equals_forward_scoring_in_model_dtype(make_llm):
    llm = make_llm(num_kv_blocks=64)
    ids = corpus_tokens(llm.tokenizer, WIKITEXT, 192)
    chunks = windows(ids, 96)
    by_steps = llm.engine.score_by_decode_steps(chunks)
    for chunk, got in zip(chunks, by_steps, strict=True):
        assert torch.allclose(got, llm.engine.score(chunk), atol=2e-3)
    assert llm.engine.blocks.num_free_blocks == 64


def test_quantized_formats_order_by_bits(make_llm):
    ids = corpus_tokens(make_llm(num_kv_blocks=8).tokenizer, WIKITEXT, 300)
    ppl = {}
    for fmt in ("auto", "bf16", "hack4", "hack2"):
        llm = make_llm(num_kv_blocks=64, kv_format=fmt)
        ppl[fmt] = perplexity_by_decode_steps(llm.engine, ids, 150).perplexity
    base = perplexity(make_llm(num_kv_blocks=8).engine.score, ids, 150).perplexity
    assert abs(ppl["auto"] - base) / base < 1e-3
    assert abs(ppl["bf16"] - base) / base < 0.01
    assert abs(ppl["hack4"] - base) / base < 0.03  # 4-bit K and V: ~0.1 % on long runs (papers.md)
    assert ppl["hack2"] > ppl["hack4"] and ppl["hack2"] > base * 1.02  # 2-bit is clearly lossy on this model


def test_closed_pages_are_quantized_once_and_never_rewritten(make_llm):
    llm = make_llm(num_kv_blocks=64, kv_format="hack2", block_size=16)
    engine = llm.engine
    ids = corpus_tokens(llm.tokenizer, WIKITEXT, 100)
    engine.add_request("q", ids, SamplingParams(max_tokens=60, ignore_eos=True))
    seq = engine.requests["q"].seq
    snapshot = None
    while engine.has_unfinished_requests():
        engine.step()
        if "q" not in engine.requests:
            break
        closed = engine.requests["q"].closed_upto
        if snapshot is None and closed >= 68:
            slots = engine.cache.slots_for(seq.block_table, 4, 68)
            snapshot = (slots, engine.cache.k[3][slots].clone())
            # the stored page holds at most 4 distinct values per channel: it is a 2-bit page
            per_channel = snapshot[1].reshape(64, -1).T
            assert max(len(torch.unique(row)) for row in per_channel) <= 4
        elif snapshot is not None:
            assert torch.equal(engine.cache.k[3][snapshot[0]], snapshot[1])
    assert snapshot is not None


@pytest.mark.parametrize("fmt", ["fp8", "hack-k4v2", "hack2r"])
def test_generation_runs_with_every_format(make_llm, fmt):
    llm = make_llm(num_kv_blocks=64, kv_format=fmt)
    out = llm.generate(corpus_tokens(llm.tokenizer, WIKITEXT, 80), SamplingParams(max_tokens=70, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 70
    assert llm.engine.blocks.num_free_blocks == 64
