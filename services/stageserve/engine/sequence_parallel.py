"""Ulysses sequence-parallel prefill over torch.distributed (gloo on CPU, NCCL on GPU).

Each of N ranks holds a contiguous shard of the prompt and runs every layer's projections, MLP and norms on
it. Attention is bracketed by all-to-alls (papers.md §2.6): sequence→heads for q, k and v (each rank then holds
the WHOLE sequence for its share of the heads and attends causally), heads→sequence for the context. KV heads
are split as evenly as N allows (uneven when N does not divide them); each query head travels with its KV head.
With a ZeroC model q/k arrive already rotated and truncated to r_qk (RoPE and R_r run before the exchange) and
v/context are in the r_v basis, so every exchange carries r/d of the bytes.

All-to-alls use ``all_to_all_single`` on one flat buffer per exchange (uneven splits allowed; gloo has it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from stageserve.models.llama import LlamaForCausalLM


def shard_bounds(num_tokens: int, world: int) -> list[tuple[int, int]]:
    """Contiguous near-equal [start, end) token shards, one per rank."""
    base, extra = divmod(num_tokens, world)
    bounds, start = [], 0
    for r in range(world):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def head_groups(num_heads: int, num_kv_heads: int, world: int) -> list[tuple[slice, slice]]:
    """Per rank: (query-head slice, KV-head slice); KV heads split near-evenly, query heads follow them."""
    if num_kv_heads < world:
        raise ValueError(f"sp: {world} ranks need at least as many KV heads (the model has {num_kv_heads})")
    group = num_heads // num_kv_heads
    return [(slice(s * group, e * group), slice(s, e)) for s, e in shard_bounds(num_kv_heads, world)]


@dataclass
class A2AStats:
    """Bytes this rank sent to other ranks, per exchange kind (q, k, v: seq→heads; out: heads→seq)."""

    bytes: dict[str, int] = field(default_factory=lambda: {"q": 0, "k": 0, "v": 0, "out": 0})

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def _all_to_all(pieces: list[torch.Tensor], recv_shapes: list[tuple[int, ...]], rank: int) -> list[torch.Tensor]:
    send = torch.cat([p.reshape(-1) for p in pieces])
    out_sizes = [int(torch.Size(s).numel()) for s in recv_shapes]
    recv = send.new_empty(sum(out_sizes))
    dist.all_to_all_single(recv, send, out_sizes, [p.numel() for p in pieces])
    return [chunk.view(shape) for chunk, shape in zip(recv.split(out_sizes), recv_shapes, strict=True)]


class UlyssesAttention:
    """The AttentionStep of one rank: q/k/v [T_r, H, ·] of this rank's tokens -> context [T_r, Hq, r_v]."""

    def __init__(self, rank: int, world: int, num_tokens: int, num_heads: int, num_kv_heads: int) -> None:
        self.rank, self.world = rank, world
        self.bounds = shard_bounds(num_tokens, world)
        self.groups = head_groups(num_heads, num_kv_heads, world)
        self.stats = A2AStats()

    def _seq_to_heads(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        idx = 0 if kind == "q" else 1
        mine = self.groups[self.rank][idx]
        pieces = [x[:, g[idx]].contiguous() for g in self.groups]
        width = mine.stop - mine.start
        shapes = [(e - s, width, x.shape[-1]) for s, e in self.bounds]
        self._count(kind, pieces)
        return torch.cat(_all_to_all(pieces, shapes, self.rank), dim=0)  # [T, H_mine, ·]

    def _heads_to_seq(self, out: torch.Tensor) -> torch.Tensor:
        pieces = [out[s:e].contiguous() for s, e in self.bounds]
        t_mine = self.bounds[self.rank][1] - self.bounds[self.rank][0]
        shapes = [(t_mine, g[0].stop - g[0].start, out.shape[-1]) for g in self.groups]
        self._count("out", pieces)
        return torch.cat(_all_to_all(pieces, shapes, self.rank), dim=1)  # [T_mine, Hq, ·]

    def _count(self, kind: str, pieces: list[torch.Tensor]) -> None:
        self.stats.bytes[kind] += sum(p.numel() * p.element_size() for r, p in enumerate(pieces) if r != self.rank)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qh, kh, vh = self._seq_to_heads(q, "q"), self._seq_to_heads(k, "k"), self._seq_to_heads(v, "v")
        out = F.scaled_dot_product_attention(
            qh.transpose(0, 1), kh.transpose(0, 1), vh.transpose(0, 1), is_causal=True, enable_gqa=True
        )
        return self._heads_to_seq(out.transpose(0, 1))


@torch.inference_mode()
def sp_prefill(model: LlamaForCausalLM, token_ids: list[int]) -> tuple[torch.Tensor, A2AStats]:
    """Runs the prompt across the initialised process group; every rank returns the final hidden states of
    ALL tokens [T, hidden] (gathered) and its own all-to-all byte counts."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = model.config
    step = UlyssesAttention(rank, world, len(token_ids), cfg.num_attention_heads, cfg.num_key_value_heads)
    start, end = step.bounds[rank]
    hidden = model(torch.tensor(token_ids[start:end]), torch.arange(start, end), step)
    shapes = [(e - s, hidden.shape[-1]) for s, e in step.bounds]
    gathered = [hidden.new_empty(s) for s in shapes]
    dist.all_gather(gathered, hidden.contiguous()) if _even(shapes) else _gather_uneven(gathered, hidden)
    return torch.cat(gathered), step.stats


def _even(shapes: list[tuple[int, int]]) -> bool:
    return len(set(shapes)) == 1


def _gather_uneven(out: list[torch.Tensor], mine: torch.Tensor) -> None:
    """all_gather of differently sized shards via all_to_all_single (every rank sends its shard to all)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    pieces = [mine.contiguous()] * world
    recv = _all_to_all(pieces, [tuple(t.shape) for t in out], rank)
    for dst, src in zip(out, recv, strict=True):
        dst.copy_(src)


def analytic_bytes_per_token(
    num_heads: int, num_kv_heads: int, head_dims: list[tuple[int, int]], world: int, element_size: int
) -> float:
    """Off-rank all-to-all bytes per prompt token (all ranks, all layers) for even splits: a fraction
    (N−1)/N of every q, k, v and context value leaves its rank (papers.md §2.6)."""
    per_token = sum(num_heads * dk + num_kv_heads * dk + num_kv_heads * dv + num_heads * dv for dk, dv in head_dims)
    return per_token * element_size * (world - 1) / world
