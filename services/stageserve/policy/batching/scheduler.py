"""Continuous-batching scheduler (pure; no torch).

What it does: each engine step it picks which sequences run and how many of their tokens are computed,
under a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``). Running
sequences go first (decodes cost one token each; an unfinished prefill continues with its next chunk),
then waiting sequences are admitted in arrival order, their prompts split into chunks that fit what is
left of the budget (chunked prefill), reusing cached prefix blocks when their prompt prefix matches.

Unit: tokens per step. Inputs: sequences added by the engine, the block manager's free blocks.

Preemption: when the KV blocks run out, the most recently admitted running sequence is preempted by
recompute: its blocks are freed and it returns to the front of the waiting queue keeping its output
tokens, so its later re-prefill reproduces the same state. Recompute costs compute but never memory
copies, the right trade on accelerators where swap bandwidth is scarce.

Trade-offs: FCFS within each queue; a long prompt does not block decodes because it is chunked.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from stageserve.policy.batching.sequence import Sequence, SequenceStatus
from stageserve.policy.kvblocks.block_manager import BlockManager


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """True when this chunk computes the sequence's last known token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # ---- queue management ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        capacity = self.blocks.num_blocks * self.blocks.block_size
        budget_needed = seq.num_tokens + seq.params.max_tokens - seq.num_output_tokens
        if budget_needed > capacity:
            raise ValueError(f"request {seq.request_id} needs {budget_needed} KV slots but the cache holds {capacity}")
        if not self.config.enable_chunked_prefill and seq.num_tokens > self.config.max_num_batched_tokens:
            raise ValueError(
                f"prompt of {seq.num_tokens} tokens exceeds max_num_batched_tokens without chunked prefill"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admits a sequence whose KV was installed from elsewhere (decode role); blocks already held."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                index += 1
                continue
            if not self._allocate_or_preempt(seq, seq.num_computed_tokens + n, out):
                continue  # seq itself was preempted; running shrank, index unchanged
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            index += 1
        if not out.preempted:
            budget = self._admit_waiting(out, budget)
        return out

    def _allocate_or_preempt(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        while not self.blocks.allocate(seq.block_table, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            out.scheduled = [s for s in out.scheduled if s.seq is not victim]
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                cached = self.blocks.match_prefix(seq.block_keys, max_tokens=seq.num_tokens - 1)
                seq.block_table.extend(cached)
                seq.num_computed_tokens = len(cached) * self.blocks.block_size
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = seq.num_computed_tokens
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.config.enable_chunked_prefill and n < seq.num_uncomputed_tokens:
                break
            if not self.blocks.allocate(seq.block_table, seq.num_computed_tokens + n):
                if not self.running:  # nothing will ever free up: the request cannot fit alone
                    raise RuntimeError(f"request {seq.request_id} does not fit in the KV cache")
                self.blocks.free(seq.block_table)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return budget
