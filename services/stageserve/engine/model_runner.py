"""Runs the model for one scheduled step: flattens the batch, plans attention, returns last-row logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stageserve.engine.attention import KVSink, NoCacheAttention, SeqChunk, TorchAttentionBackend
from stageserve.engine.kv_quant import SeqCodes
from stageserve.models.llama import LlamaForCausalLM
from stageserve.policy.batching.scheduler import ScheduledSeq


@dataclass(frozen=True)
class ImageEmbeds:
    """One image's token embeddings [n, hidden], placed at prompt positions [start, start + n); ``key`` is a
    content hash of the image (prefix-cache keys)."""

    start: int
    embeds: torch.Tensor
    key: int

    @property
    def end(self) -> int:
        return self.start + self.embeds.shape[0]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: TorchAttentionBackend) -> None:
        self.model = model
        self.backend = backend

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledSeq],
        sinks: dict[str, KVSink],
        exported: dict[str, int],
        images: dict[str, list[ImageEmbeds]] | None = None,
        codes: dict[str, SeqCodes] | None = None,
    ) -> torch.Tensor:
        """Computes the scheduled tokens; returns logits [n, V] for the sequences whose chunk completes
        them (in ``scheduled`` order). ``sinks`` receive each exporting request's KV layer by layer;
        ``images`` put image embeddings in place of the placeholder tokens they cover; ``codes`` are the
        requests' closed pages in the backend's code store (decode steps then attend on them)."""
        tokens: list[int] = []
        positions: list[int] = []
        chunks: list[SeqChunk] = []
        last_rows: list[int] = []
        for s in scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            rid = seq.request_id
            chunks.append(
                SeqChunk(
                    len(tokens),
                    s.num_new_tokens,
                    start,
                    seq.block_table,
                    sinks.get(rid),
                    exported.get(rid, 0),
                    (codes or {}).get(rid),
                )
            )
            tokens.extend(seq.token_ids[start : start + s.num_new_tokens])
            positions.extend(range(start, start + s.num_new_tokens))
            if s.completes:
                last_rows.append(len(tokens) - 1)
        step = self.backend.plan(chunks)
        ids = torch.tensor(tokens)
        embeds = self._embeds(ids, scheduled, chunks, images) if images else None
        hidden = self.model(ids, torch.tensor(positions), step, embeds)
        return self.model.logits(hidden[last_rows])

    def _embeds(
        self,
        ids: torch.Tensor,
        scheduled: list[ScheduledSeq],
        chunks: list[SeqChunk],
        images: dict[str, list[ImageEmbeds]],
    ) -> torch.Tensor | None:
        """Token embeddings of the step with the image rows that this step computes overwritten."""
        rows: list[tuple[int, ImageEmbeds, int, int]] = []
        for s, chunk in zip(scheduled, chunks, strict=True):
            lo, hi = chunk.start_pos, chunk.start_pos + chunk.q_len
            for img in images.get(s.seq.request_id, ()):
                a, b = max(lo, img.start), min(hi, img.end)
                if a < b:
                    rows.append((chunk.row_start + a - lo, img, a - img.start, b - img.start))
        if not rows:
            return None
        x = self.model.embed_tokens(ids)
        for row, img, a, b in rows:
            x[row : row + b - a] = img.embeds[a:b].to(x.dtype)
        return x

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Log-probability of each token given the ones before it: [len - 1] float32 (no cache used)."""
        ids = torch.tensor(token_ids)
        hidden = self.model(ids, torch.arange(len(token_ids)), NoCacheAttention(self.backend.sliding_window))
        logprobs = torch.log_softmax(self.model.logits(hidden[:-1]), dim=-1)
        return logprobs.gather(1, ids[1:].unsqueeze(1)).squeeze(1)
