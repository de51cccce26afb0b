"""``stageserve sp-prefill --sp N``: one prompt prefilled by N processes (Ulysses, gloo), checked against the
single-process forward, with the all-to-all bytes per prompt token for the model as given (e.g. a ZeroC dir)
and, for reference, the uncompressed head_dim.

Processes are started with torch.multiprocessing (spawn) and a gloo group on 127.0.0.1; each loads the model
itself. ``model="tiny"`` builds a small seeded random Llama (with ZeroC ranks if asked), for tests.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stageserve.engine.attention import NoCacheAttention
from stageserve.engine.sequence_parallel import analytic_bytes_per_token, sp_prefill
from stageserve.models.config import ModelConfig, RopeScaling
from stageserve.models.llama import LlamaForCausalLM
from stageserve.models.zeroc import Bases, RankPlan, ZeroCModel


@dataclass(frozen=True)
class SPResult:
    hidden: torch.Tensor  # [T, hidden] gathered on rank 0
    bytes_by_rank: list[dict[str, int]]
    seconds: float


def tiny_config(num_kv_heads: int = 3, group: int = 2, head_dim: int = 16, layers: int = 2) -> ModelConfig:
    heads = num_kv_heads * group
    return ModelConfig(
        "llama",
        128,
        heads * head_dim,
        96,
        layers,
        heads,
        num_kv_heads,
        head_dim,
        1e-5,
        10000.0,
        RopeScaling(),
        256,
        True,
        False,
        False,
        None,
        None,
        (),
        "tiny",
    )


def tiny_model(seed: int = 0, ranks: tuple[int, int] | None = None) -> LlamaForCausalLM:
    """A seeded random Llama; with ``ranks`` (r_qk, r_v) ZeroC-compressed with seeded random orthonormal bases."""
    torch.manual_seed(seed)
    cfg = tiny_config()
    model = LlamaForCausalLM(cfg).eval()
    if ranks is not None:
        d, h = cfg.head_dim, cfg.num_key_value_heads
        orth = lambda: torch.linalg.qr(torch.randn(h, d, d))[0]  # noqa: E731
        energy = torch.ones(h, d)
        n = cfg.num_hidden_layers
        bases = Bases([orth() for _ in range(n)], [orth() for _ in range(n)], [energy] * n, [energy] * n)
        ZeroCModel(model, bases).apply(RankPlan.uniform(n, *ranks))
    return model


def _load(spec: dict[str, Any]) -> LlamaForCausalLM:
    if spec["model"] == "tiny":
        return tiny_model(spec.get("seed", 0), tuple(spec["ranks"]) if spec.get("ranks") else None)
    from stageserve.models.loader import load_model

    return load_model(spec["model"], torch.float32).model


def _worker(rank: int, world: int, port: int, spec: dict[str, Any], token_ids: list[int], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _load(spec)
        dist.barrier()
        t0 = time.perf_counter()
        hidden, stats = sp_prefill(model, token_ids)
        seconds = time.perf_counter() - t0
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, stats.bytes)
        if rank == 0:
            torch.save({"hidden": hidden, "bytes": gathered, "seconds": seconds}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_sp(spec: dict[str, Any], token_ids: list[int], world: int) -> SPResult:
    """Spawns ``world`` gloo processes that prefill ``token_ids`` together; returns rank 0's view."""
    if world < 1:
        raise ValueError(f"--sp: must be >= 1, got {world}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, _free_port(), spec, token_ids, out), nprocs=world, join=True)
        res = torch.load(out, weights_only=True)  # tensors and numbers only: no pickle code paths
    return SPResult(res["hidden"], res["bytes"], res["seconds"])


@torch.inference_mode()
def single_process(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor(token_ids), torch.arange(len(token_ids)), NoCacheAttention())


# ---- CLI ---------------------------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser("sp-prefill", help="Ulysses sequence-parallel prefill across N gloo processes (check+bytes)")
    p.add_argument("--model", default=None, help="HF/GGUF/ZeroC directory (default: embedded SmolLM2-135M)")
    p.add_argument("--sp", type=int, default=2, help="number of processes")
    p.add_argument("--tokens", type=int, default=256, help="prompt tokens (second half of wikitext-2 test)")
    p.add_argument("--data", default="../shared/data/wikitext2/test.txt")
    p.set_defaults(func=_main)


def _main(args: Any) -> int:
    from stageserve.models.loader import load_model
    from stageserve.tools.eval_ppl import corpus_split_tokens

    if args.tokens < args.sp:
        raise ValueError(f"--tokens: need at least --sp={args.sp} tokens")
    loaded = load_model(args.model, torch.float32)
    ids = corpus_split_tokens(loaded.tokenizer, args.data, "eval", args.tokens)
    result = run_sp({"model": args.model or loaded.path}, ids, args.sp)
    t0 = time.perf_counter()
    ref = single_process(loaded.model, ids)
    single_s = time.perf_counter() - t0
    cfg = loaded.config
    sent = sum(sum(b.values()) for b in result.bytes_by_rank)
    full = analytic_bytes_per_token(
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        [(cfg.head_dim, cfg.head_dim)] * cfg.num_hidden_layers,
        args.sp,
        4,
    )
    report = {
        "model": loaded.name,
        "sp": args.sp,
        "tokens": len(ids),
        "max_abs_diff_vs_single": float((result.hidden - ref).abs().max()),
        "a2a_bytes_per_token_measured": sent / len(ids),
        "a2a_bytes_per_token_analytic": analytic_bytes_per_token(
            cfg.num_attention_heads, cfg.num_key_value_heads, loaded.model.kv_head_dims(), args.sp, 4
        ),
        "a2a_bytes_per_token_uncompressed_analytic": full,
        "a2a_bytes_by_kind": {k: sum(b[k] for b in result.bytes_by_rank) for k in result.bytes_by_rank[0]},
        "sp_seconds": round(result.seconds, 3),
        "single_seconds": round(single_s, 3),
    }
    print(json.dumps(report, indent=2))
    return 0
