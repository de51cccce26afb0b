"""Runs the model for one scheduled step: flattens the batch, plans attention, returns last-row logits."""

from __future__ import annotations

import torch

from stageserve.engine.attention import KVSink, NoCacheAttention, SeqChunk, TorchAttentionBackend
from stageserve.models.llama import LlamaForCausalLM
from stageserve.policy.batching.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: TorchAttentionBackend) -> None:
        self.model = model
        self.backend = backend

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledSeq], sinks: dict[str, KVSink], exported: dict[str, int]
    ) -> torch.Tensor:
        """Computes the scheduled tokens; returns logits [n, V] for the sequences whose chunk completes
        them (in ``scheduled`` order). ``sinks`` receive each exporting request's KV layer by layer."""
        tokens: list[int] = []
        positions: list[int] = []
        chunks: list[SeqChunk] = []
        last_rows: list[int] = []
        for s in scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            rid = seq.request_id
            chunks.append(
                SeqChunk(len(tokens), s.num_new_tokens, start, seq.block_table, sinks.get(rid), exported.get(rid, 0))
            )
            tokens.extend(seq.token_ids[start : start + s.num_new_tokens])
            positions.extend(range(start, start + s.num_new_tokens))
            if s.completes:
                last_rows.append(len(tokens) - 1)
        step = self.backend.plan(chunks)
        hidden = self.model(torch.tensor(tokens), torch.tensor(positions), step)
        return self.model.logits(hidden[last_rows])

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Log-probability of each token given the ones before it: [len - 1] float32 (no cache used)."""
        ids = torch.tensor(token_ids)
        hidden = self.model(ids, torch.arange(len(token_ids)), NoCacheAttention(self.backend.sliding_window))
        logprobs = torch.log_softmax(self.model.logits(hidden[:-1]), dim=-1)
        return logprobs.gather(1, ids[1:].unsqueeze(1)).squeeze(1)
