"""Per-request state that the scheduler and the engine share (pure)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from stageserve.core.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request: its tokens (prompt then output), how many have KV computed, and its blocks.

    ``num_computed_tokens`` counts tokens whose K/V sit in the cache. A sequence needs a model step
    while ``num_computed_tokens < num_tokens``; when a step computes its last token the engine samples
    one more. Preemption by recompute resets ``num_computed_tokens`` to 0 and keeps the output tokens,
    so the sequence later re-prefills prompt + output and continues exactly where it was.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: str | None = None
    num_cached_prompt_tokens: int = 0
    # (start, length, content key) of each image token run: prefix-cache keys use the image's content key
    # instead of the placeholder ids, so different images at the same positions never share blocks.
    image_spans: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def block_keys(self) -> list[int]:
        """The ids block hashes are computed over: token ids, image positions replaced by negative keys
        derived from the image content (never equal to a token id)."""
        if not self.image_spans:
            return self.token_ids
        keys = list(self.token_ids)
        for start, length, key in self.image_spans:
            for j in range(length):
                keys[start + j] = -1 - ((key + j) % (1 << 62))
        return keys

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
