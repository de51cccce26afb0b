"""Sampling, stopping and streaming behaviour of the engine."""

from __future__ import annotations

import pytest

from stageserve.core.sampling import InvalidRequestError
from stageserve.engine import SamplingParams

PROMPT = "Tell me a story about a dragon."


def _tokens(llm, params, prompt=PROMPT):
    return llm.generate(prompt, params)[0].outputs[0]


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(llm):
    a = _tokens(llm, SamplingParams(max_tokens=16, temperature=1.0, seed=7))
    b = _tokens(llm, SamplingParams(max_tokens=16, temperature=1.0, seed=7))
    c = _tokens(llm, SamplingParams(max_tokens=16, temperature=1.0, seed=8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_equals_greedy(llm):
    greedy = _tokens(llm, SamplingParams(max_tokens=12))
    top1 = _tokens(llm, SamplingParams(max_tokens=12, temperature=0.8, top_k=1, seed=3))
    tiny_p = _tokens(llm, SamplingParams(max_tokens=12, temperature=0.8, top_p=1e-6, seed=3))
    assert greedy.token_ids == top1.token_ids == tiny_p.token_ids


def test_stop_string_cuts_text_and_finishes(llm):
    full = _tokens(llm, SamplingParams(max_tokens=30, ignore_eos=True))
    word = full.text.split()[3]
    out = _tokens(llm, SamplingParams(max_tokens=30, stop=(word,), ignore_eos=True))
    assert out.finish_reason == "stop"
    assert word not in out.text
    assert full.text.startswith(out.text)
    kept = _tokens(llm, SamplingParams(max_tokens=30, stop=(word,), include_stop_str_in_output=True, ignore_eos=True))
    assert kept.text.endswith(word)


def test_stop_token_id_and_max_tokens(llm):
    full = _tokens(llm, SamplingParams(max_tokens=10, ignore_eos=True))
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    stop_at = full.token_ids[4]
    out = _tokens(llm, SamplingParams(max_tokens=10, stop_token_ids=(stop_at,), ignore_eos=True))
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: full.token_ids.index(stop_at) + 1]


def test_eos_stops_and_min_tokens_delays_it(llm):
    chat = llm.apply_chat_template([{"role": "user", "content": "Say hi."}])
    natural = llm.generate([chat], SamplingParams(max_tokens=64))[0].outputs[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] in llm.engine.model_config.eos_token_ids
    longer = llm.generate([chat], SamplingParams(max_tokens=64, min_tokens=len(natural.token_ids) + 2))[0].outputs[0]
    assert len(longer.token_ids) >= len(natural.token_ids) + 2


def test_stream_deltas_add_up_to_the_full_text(llm):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    events = list(llm.stream(PROMPT, params))
    assert events[-1].finished and all(not e.finished for e in events[:-1])
    assert len(events) >= 10  # streamed token by token, not in one piece
    full = _tokens(llm, params)
    assert "".join(e.text for e in events) == full.text
    assert [t for e in events for t in e.token_ids] == full.token_ids
    assert full.text == llm.tokenizer.decode(full.token_ids, skip_special_tokens=True)


def test_bad_requests_are_rejected_with_the_field_named(llm):
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="context"):
        llm.generate([[1] * 10], SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[10**9]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
