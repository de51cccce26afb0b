"""The migration relay's bookkeeping (serving/gateway/migration.py), driven by scripted attempts: which request
each re-dispatch sends, what the client sees, and the bounds. The real pipeline is tested in test_faults.py."""

from __future__ import annotations

import asyncio

import pytest

from stageserve.core.sampling import SamplingParams
from stageserve.serving.common.errors import BadRequest, Unavailable
from stageserve.serving.gateway.http import GenerateDelta, HttpGenerateRequest, TenantHeaders
from stageserve.serving.gateway.migration import Migrator, replay_request

TENANT = TenantHeaders("u", "a", "i", 0)


def _delta(tokens, finished=False, completion=0):
    return GenerateDelta("".join(f"<{t}>" for t in tokens), list(tokens), finished, "length" if finished else None,
                         99, completion, 0)


def _run(request, script, max_migrations=3, exact_max=1024):
    """script: one list per attempt of deltas or an exception to raise there."""
    seen: list[HttpGenerateRequest] = []

    async def attempt(req):
        seen.append(req)
        for item in script[len(seen) - 1]:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def nothing():
        return None

    migrator = Migrator(max_migrations, 1.0, nothing, lambda: True, exact_max_tokens=exact_max,
                        detokenize=lambda ids: "".join(f"<{t}>" for t in ids))

    async def main():
        return [d async for d in migrator.run(request, attempt)]

    return asyncio.run(main()), seen, migrator.stats


def _request(**params):
    return HttpGenerateRequest("r", [7, 8, 9], SamplingParams(**{"max_tokens": 5, **params}), TENANT)


def test_replay_continues_after_the_sent_tokens():
    request = _request(temperature=0.7, min_tokens=4)  # unseeded sampling: replay
    out, seen, stats = _run(request, [[_delta([1, 2]), _delta([3]), Unavailable("decode died")],
                                      [_delta([4]), _delta([5], True, 2)]])
    assert [t for d in out for t in d.token_ids] == [1, 2, 3, 4, 5]
    assert "".join(d.text for d in out) == "<1><2><3><4><5>"
    assert (out[-1].completion_tokens, out[-1].prompt_tokens) == (5, 3)
    replay = seen[1]
    assert replay.request_id == "r.m1" and replay.prompt_token_ids == [7, 8, 9, 1, 2, 3]
    assert (replay.params.max_tokens, replay.params.min_tokens, replay.params.seed_offset) == (2, 1, 3)
    assert (stats.migrations, stats.migrated_requests) == (1, 1)


def test_greedy_reruns_and_swallows_what_the_client_has():
    out, seen, _ = _run(_request(), [[_delta([1, 2]), _delta([3]), Unavailable("x")],
                                     [_delta([1, 2, 3, 4]), _delta([5], True, 5)]])
    assert [t for d in out for t in d.token_ids] == [1, 2, 3, 4, 5]
    assert "".join(d.text for d in out) == "<1><2><3><4><5>"
    assert seen[1].prompt_token_ids == [7, 8, 9] and seen[1].params.max_tokens == 5
    assert out[-1].completion_tokens == 5


def test_a_diverging_rerun_falls_back_to_replay():
    out, seen, stats = _run(_request(), [[_delta([1, 2]), Unavailable("x")],
                                         [_delta([1, 6])],
                                         [_delta([3, 4]), _delta([5], True, 3)]])
    assert [t for d in out for t in d.token_ids] == [1, 2, 3, 4, 5]
    assert seen[2].prompt_token_ids == [7, 8, 9, 1, 2] and stats.migrations == 2


def test_long_streams_replay_instead_of_rerunning():
    _, seen, _ = _run(_request(), [[_delta([1, 2, 3]), Unavailable("x")], [_delta([4, 5], True, 2)]], exact_max=2)
    assert seen[1].prompt_token_ids == [7, 8, 9, 1, 2, 3]


def test_migrations_are_bounded():
    with pytest.raises(Unavailable):
        _run(_request(), [[Unavailable("x")]] * 3, max_migrations=2)


def test_a_bad_request_is_not_retried():
    with pytest.raises(BadRequest):
        _run(_request(), [[BadRequest("prompt: bad")], [_delta([1], True, 1)]])


def test_replay_request_keeps_the_seed_and_counts_offsets():
    r = replay_request(_request(seed=5, min_tokens=1), [4, 4], 2)
    assert (r.params.seed, r.params.seed_offset, r.params.max_tokens, r.params.min_tokens) == (5, 2, 3, 0)
    assert r.request_id == "r.m2"


def test_seed_offset_resumes_a_seeded_generator(llm):
    """A request replayed after g tokens with seed_offset=g samples what the uninterrupted one sampled next."""
    prompt = llm.engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=77, ignore_eos=True)
    full = llm.generate([prompt], params)[0].outputs[0].token_ids
    g = 5
    rest = SamplingParams(max_tokens=12 - g, temperature=0.9, seed=77, ignore_eos=True, seed_offset=g)
    resumed = llm.generate([prompt + full[:g]], rest)[0].outputs[0].token_ids
    assert resumed == full[g:]
    without = llm.generate([prompt + full[:g]], SamplingParams(max_tokens=12 - g, temperature=0.9, seed=77,
                                                                ignore_eos=True))[0].outputs[0].token_ids
    assert without != full[g:]  # the offset is what makes it line up


def test_fail_open_limits_each_tenant_locally():
    from stageserve.serving.common.errors import Overloaded
    from stageserve.serving.gateway.throttler_fallback import LocalTenantLimiter

    limiter = LocalTenantLimiter(2)
    limiter.admit("a1", ("alice", "app"), "UNAVAILABLE")
    limiter.admit("a2", ("alice", "app"), "UNAVAILABLE")
    limiter.admit("b1", ("bob", "app"), "UNAVAILABLE")  # another tenant is not affected
    with pytest.raises(Overloaded, match="alice/app is at its local limit of 2") as info:
        limiter.admit("a3", ("alice", "app"), "UNAVAILABLE")
    assert info.value.retry_after_s == 1.0
    assert limiter.release("a1") and not limiter.release("throttler-admitted")
    limiter.admit("a3", ("alice", "app"), "UNAVAILABLE")
    assert limiter.fallback_admissions == 4
