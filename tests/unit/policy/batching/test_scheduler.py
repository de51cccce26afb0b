"""Scheduler: token budget, chunked prefill, running-first, preemption by recompute, prefix reuse."""

from __future__ import annotations

import pytest

from stageserve.core.sampling import SamplingParams
from stageserve.policy.batching.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from stageserve.policy.batching.sequence import Sequence, SequenceStatus
from stageserve.policy.kvblocks.block_manager import BlockManager


# ---- helpers ------------------------------------------------------------------------------------
def make_seq(request_id: str, prompt: list[int], max_tokens: int = 16, arrival: float = 0.0) -> Sequence:
    return Sequence(
        request_id=request_id,
        token_ids=list(prompt),
        num_prompt_tokens=len(prompt),
        params=SamplingParams(max_tokens=max_tokens),
        arrival_time=arrival,
    )


def make_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    prefix_caching: bool = True,
    chunked: bool = True,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=chunked,
        ),
        BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching),
    )


def fake_token(seq: Sequence) -> int:
    return 1000 + seq.num_tokens


def apply(sched: Scheduler, out: SchedulerOutput) -> None:
    """Plays the engine: computes the scheduled tokens, commits full blocks, samples, finishes."""
    completing = [s.seq for s in out.scheduled if s.completes]  # before num_computed_tokens moves
    for item in out.scheduled:
        seq = item.seq
        seq.num_computed_tokens += item.num_new_tokens
        sched.blocks.commit_full_blocks(seq.block_table, seq.token_ids, seq.num_computed_tokens)
    for seq in completing:
        seq.token_ids.append(fake_token(seq))
        if seq.num_output_tokens >= seq.params.max_tokens:
            sched.finish(seq, "length")


def step(sched: Scheduler) -> tuple[list[tuple[str, int]], list[str]]:
    """One engine step; returns [(request_id, num_new_tokens)] and the preempted request ids."""
    out = sched.schedule()
    plan = [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]
    preempted = [s.request_id for s in out.preempted]
    apply(sched, out)
    return plan, preempted


def prompt(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + n))


# ---- config / add / finish ----------------------------------------------------------------------
@pytest.mark.parametrize("max_num_seqs,max_num_batched_tokens", [(0, 8), (8, 0)])
def test_config_rejects_zero_limits(max_num_seqs: int, max_num_batched_tokens: int) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)


def test_add_rejects_request_that_can_never_fit() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)  # 16 slots
    with pytest.raises(ValueError, match="needs 17 KV slots"):
        sched.add(make_seq("big", prompt(10), max_tokens=7))
    assert not sched.has_work()
    fits = make_seq("ok", prompt(10), max_tokens=6)
    sched.add(fits)
    assert list(sched.waiting) == [fits]
    assert fits.status is SequenceStatus.WAITING


def test_add_rejects_long_prompt_without_chunked_prefill() -> None:
    sched = make_scheduler(max_num_batched_tokens=8, chunked=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        sched.add(make_seq("long", prompt(9)))
    sched.add(make_seq("short", prompt(8)))
    assert step(sched)[0] == [("short", 8)]


def test_finish_frees_blocks() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4)
    seq = make_seq("a", prompt(10))
    sched.add(seq)
    step(sched)
    assert len(seq.block_table) == 3
    assert sched.blocks.num_free_blocks == 5
    sched.finish(seq, "stop")
    assert seq.block_table == []
    assert sched.blocks.num_free_blocks == 8
    assert sched.blocks.usage == 0.0
    assert seq.status is SequenceStatus.FINISHED
    assert seq.finish_reason == "stop"
    assert sched.running == []
    assert not sched.has_work()
    assert step(sched) == ([], [])


def test_finish_removes_waiting_sequence() -> None:
    sched = make_scheduler()
    a, b = make_seq("a", prompt(3)), make_seq("b", prompt(3))
    sched.add(a)
    sched.add(b)
    sched.finish(a, "abort")
    assert list(sched.waiting) == [b]
    assert step(sched)[0] == [("b", 3)]


# ---- budget / chunking / ordering ---------------------------------------------------------------
def test_token_budget_respected_every_step() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    for i, rid in enumerate("abc"):
        sched.add(make_seq(rid, prompt(5, base=100 * i), max_tokens=3))
    steps = []
    while sched.has_work():
        plan, preempted = step(sched)
        assert preempted == []
        assert sum(n for _, n in plan) <= 8
        steps.append(plan)
        assert len(steps) < 20
    assert steps == [
        [("a", 5), ("b", 3)],  # b's prompt is chunked to fill the budget exactly
        [("a", 1), ("b", 2), ("c", 5)],
        [("a", 1), ("b", 1), ("c", 1)],  # a finishes after this step (3 outputs)
        [("b", 1), ("c", 1)],
    ]


def test_long_prompt_is_chunked_across_steps() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq("long", prompt(20), max_tokens=2)
    sched.add(seq)
    out = sched.schedule()
    assert [(s.num_new_tokens, s.completes) for s in out.scheduled] == [(8, False)]
    apply(sched, out)
    assert seq.num_computed_tokens == 8
    assert seq.num_output_tokens == 0
    out = sched.schedule()
    assert [(s.num_new_tokens, s.completes) for s in out.scheduled] == [(8, False)]
    apply(sched, out)
    out = sched.schedule()
    assert [(s.num_new_tokens, s.completes) for s in out.scheduled] == [(4, True)]
    apply(sched, out)
    assert seq.num_computed_tokens == 20
    assert seq.output_token_ids == [1020]
    assert step(sched)[0] == [("long", 1)]  # then plain decode
    assert seq.status is SequenceStatus.FINISHED


def test_running_sequences_go_before_new_prefills() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add(make_seq("a", prompt(4)))
    assert step(sched)[0] == [("a", 4)]
    sched.add(make_seq("b", prompt(20, base=100)))
    assert step(sched)[0] == [("a", 1), ("b", 7)]
    sched.add(make_seq("c", prompt(3, base=200)))
    # b's unfinished prefill is running too: it continues before c is admitted.
    assert step(sched)[0] == [("a", 1), ("b", 7)]
    assert [s.request_id for s in sched.waiting] == ["c"]
    assert step(sched)[0] == [("a", 1), ("b", 6), ("c", 1)]


def test_max_num_seqs_respected() -> None:
    sched = make_scheduler(max_num_seqs=2)
    a, b, c = (make_seq(r, prompt(3, base=100 * i), max_tokens=2) for i, r in enumerate("abc"))
    for seq in (a, b, c):
        sched.add(seq)
    assert step(sched)[0] == [("a", 3), ("b", 3)]
    assert [s.request_id for s in sched.running] == ["a", "b"]
    assert list(sched.waiting) == [c]
    assert step(sched)[0] == [("a", 1), ("b", 1)]  # both finish (2 outputs each)
    assert sched.running == []
    assert step(sched)[0] == [("c", 3)]


def test_add_running_schedules_a_decode() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    seq = make_seq("imported", prompt(5))
    assert sched.blocks.allocate(seq.block_table, 5)
    seq.num_computed_tokens = 5
    seq.token_ids.append(7)
    sched.add_running(seq)
    assert seq.status is SequenceStatus.RUNNING
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens, s.completes) for s in out.scheduled] == [(seq, 1, True)]


# ---- preemption ---------------------------------------------------------------------------------
def test_preempts_most_recently_admitted_and_resumes_with_outputs() -> None:
    # 6 blocks of 4 slots; three 6-token prompts take 2 blocks each, so the 9th token needs a 3rd.
    sched = make_scheduler(num_blocks=6, block_size=4, prefix_caching=False)
    a = make_seq("a", prompt(6, base=10), max_tokens=5)
    b = make_seq("b", prompt(6, base=20), max_tokens=5)
    c = make_seq("c", prompt(6, base=30), max_tokens=8)
    for seq in (a, b, c):
        sched.add(seq)
    assert step(sched) == ([("a", 6), ("b", 6), ("c", 6)], [])
    assert sched.blocks.num_free_blocks == 0
    assert step(sched) == ([("a", 1), ("b", 1), ("c", 1)], [])
    assert step(sched) == ([("a", 1), ("b", 1), ("c", 1)], [])
    assert c.num_output_tokens == 3
    outputs_before = list(c.output_token_ids)
    late = make_seq("late", prompt(2, base=40), max_tokens=2)
    sched.add(late)

    out = sched.schedule()
    assert out.preempted == [c]
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 1)]
    assert c.num_computed_tokens == 0
    assert c.block_table == []
    assert c.num_preemptions == 1
    assert c.status is SequenceStatus.WAITING
    assert c.output_token_ids == outputs_before
    assert c.num_tokens == 9
    assert list(sched.waiting) == [c, late]  # the preempted one goes to the front
    assert sched.running == [a, b]
    apply(sched, out)
    assert a.num_preemptions == 0 and b.num_preemptions == 0

    # a and b each hold 3 blocks now: nothing is left for c (9 tokens -> 3 blocks), and late waits
    # behind it (FCFS).
    assert step(sched) == ([("a", 1), ("b", 1)], [])
    assert a.status is SequenceStatus.FINISHED and b.status is SequenceStatus.FINISHED
    assert list(sched.waiting) == [c, late]
    assert sched.blocks.num_free_blocks == 6

    # c re-prefills prompt + its 3 outputs in one go and continues where it was.
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens, s.completes) for s in out.scheduled] == [
        ("c", 9, True),
        ("late", 2, True),
    ]
    apply(sched, out)
    assert c.output_token_ids[:3] == outputs_before
    assert c.num_output_tokens == 4
    assert c.num_computed_tokens == 9
    assert c.num_preemptions == 1


def test_sequence_that_needs_a_block_can_preempt_itself() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4, prefix_caching=False)
    a = make_seq("a", prompt(1), max_tokens=8)
    b = make_seq("b", prompt(6, base=50), max_tokens=6)
    sched.add(a)
    sched.add(b)
    for _ in range(3):
        assert step(sched)[1] == []
    assert (a.num_tokens, b.num_tokens) == (4, 9)
    out = sched.schedule()
    # b is the last admitted, so it is its own victim; a keeps running.
    assert out.preempted == [b]
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1)]
    assert sched.running == [a]
    assert list(sched.waiting) == [b]
    assert b.num_computed_tokens == 0 and b.num_tokens == 9 and b.num_preemptions == 1
    assert sched.blocks.num_free_blocks == 2


def test_no_admission_in_a_step_that_preempted() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4, max_num_batched_tokens=5, prefix_caching=False)
    a = make_seq("a", prompt(1), max_tokens=8)
    b = make_seq("b", prompt(6, base=10), max_tokens=6)
    sched.add(a)
    sched.add(b)
    assert step(sched) == ([("a", 1), ("b", 4)], [])
    assert step(sched) == ([("a", 1), ("b", 2)], [])
    assert step(sched) == ([("a", 1), ("b", 1)], [])
    assert step(sched) == ([("a", 1), ("b", 1)], [])
    assert (a.num_tokens, b.num_tokens, sched.blocks.num_free_blocks) == (5, 9, 0)
    out = sched.schedule()
    # a's 5th token opens a 2nd block: b is preempted. A 4-token chunk of b would fit in the block
    # left free and in the budget left, but nothing is admitted in a step that preempted.
    assert out.preempted == [b]
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1)]
    assert sched.blocks.num_free_blocks == 1
    assert list(sched.waiting) == [b]
    apply(sched, out)
    # The next step re-admits b with a chunk of its prompt + outputs.
    assert step(sched) == ([("a", 1), ("b", 4)], [])
    assert (b.num_computed_tokens, b.num_tokens, b.num_preemptions) == (4, 9, 1)


# ---- prefix cache at admission ------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len,cached", [(10, 8), (8, 4), (9, 8), (3, 0)])
def test_identical_prompt_reuses_committed_full_blocks(prompt_len: int, cached: int) -> None:
    sched = make_scheduler(num_blocks=16, block_size=4)
    tokens = prompt(prompt_len, base=500)
    first = make_seq("first", tokens)
    sched.add(first)
    assert step(sched)[0] == [("first", prompt_len)]

    second = make_seq("second", tokens)
    sched.add(second)
    free_before = sched.blocks.num_free_blocks
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("first", 1),
        ("second", prompt_len - cached),
    ]
    assert second.num_computed_tokens == cached
    assert second.num_cached_prompt_tokens == cached
    n_shared = cached // 4
    assert second.block_table[:n_shared] == first.block_table[:n_shared]
    assert set(second.block_table[n_shared:]).isdisjoint(first.block_table)
    for block_id in first.block_table[:n_shared]:
        assert sched.blocks.blocks[block_id].ref_count == 2
    new_blocks = -(-prompt_len // 4) - n_shared
    first_growth = 1 if prompt_len % 4 == 0 else 0  # first's decode token opens a new block
    assert sched.blocks.num_free_blocks == free_before - new_blocks - first_growth
    assert out.scheduled[1].completes
    apply(sched, out)
    assert second.num_computed_tokens == prompt_len
    assert second.output_token_ids == [1000 + prompt_len]


def test_prefix_cache_disabled_recomputes_everything() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, prefix_caching=False)
    tokens = prompt(10)
    sched.add(make_seq("first", tokens))
    step(sched)
    second = make_seq("second", tokens)
    sched.add(second)
    assert step(sched)[0] == [("first", 1), ("second", 10)]
    assert second.num_cached_prompt_tokens == 0


def test_prompt_matching_finished_request_reuses_freed_cached_blocks() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4)
    tokens = prompt(12, base=300)
    first = make_seq("first", tokens, max_tokens=1)
    sched.add(first)
    step(sched)
    assert first.status is SequenceStatus.FINISHED
    assert sched.blocks.num_free_blocks == 16
    second = make_seq("second", tokens + [7, 7])
    sched.add(second)
    assert step(sched)[0] == [("second", 2)]
    assert second.num_cached_prompt_tokens == 12


def test_preempted_sequence_resumes_from_its_own_cached_blocks() -> None:
    sched = make_scheduler(num_blocks=5, block_size=4, max_num_batched_tokens=64)
    a = make_seq("a", prompt(6), max_tokens=4)
    b = make_seq("b", prompt(6, base=10), max_tokens=8)
    sched.add(a)
    sched.add(b)
    for _ in range(3):
        assert step(sched)[1] == []
    assert b.num_cached_prompt_tokens == 0
    # a takes the last free block for its 9th token; b then has to preempt itself.
    plan, preempted = step(sched)
    assert (plan, preempted) == ([("a", 1)], ["b"])
    assert a.status is SequenceStatus.FINISHED  # 4 outputs: its blocks are free again
    assert sched.blocks.num_free_blocks == 5
    out = sched.schedule()
    # b's two full blocks (prompt + 2 outputs) were committed before the preemption and are still
    # cached: only its 9th token is recomputed.
    assert [(s.seq, s.num_new_tokens, s.completes) for s in out.scheduled] == [(b, 1, True)]
    assert b.num_computed_tokens == 8
    assert b.num_cached_prompt_tokens == 0  # counts prompt-cache hits of the first admission only
    assert sched.blocks.prefix_hit_tokens == 8
    apply(sched, out)
    assert b.num_output_tokens == 4
