"""Replay a ServeGen multimodal day through the operator's autoscaler vs static peak provisioning.

    .venv/bin/python benchmarks/autoscale_sim.py [--data ../shared/data/servegen_mm_image] [--seeds 0 1 2]

Prints a markdown table (GPU-hours per stage, SLO attainment, replica changes, GPU-hours saved) for a
decoder-only (image tokens are prefill load) and a cross-attention model. The capacity model and its
numbers are described in ``stageserve_operator.sim``; capacities are illustrative per-GPU figures, not
profiles of a real GPU.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from stageserve_operator.sim import STAGES, SimConfig, peak_replicas, servegen_load, simulate

CAPACITY = {"encoder": 1000.0, "prefill": 2000.0, "decode": 200.0}  # tokens/s per GPU replica at the SLO


def oracle_gpu_hours(load, cfg: SimConfig) -> float:  # noqa: ANN001
    """ceil(load/capacity) per minute with instant, free scaling: a lower bound no real autoscaler reaches."""
    total = 0.0
    for s in STAGES:
        tok = load.stages[s].tokens
        k = len(tok) // 60
        per_min = tok[: k * 60].reshape(k, 60).mean(axis=1)
        total += sum(max(cfg.min_replicas, math.ceil(v / cfg.capacity[s])) for v in per_min) / 60
    return total


def run(data: str, seeds: list[int]) -> str:
    rows = ["| model kind | seed | provisioning | encoder GPU-h | prefill GPU-h | decode GPU-h | total GPU-h | "
            "SLO attainment | replica changes | GPU-h saved vs static |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    cfg = SimConfig(capacity=CAPACITY)
    for kind in ("decOnly", "croAttn"):
        for seed in seeds:
            t0 = time.perf_counter()
            load = servegen_load(data, model_kind=kind, seed=seed)
            peak = peak_replicas(load, cfg)
            static = simulate(load, cfg, static=peak)
            auto = simulate(load, cfg)
            oracle = oracle_gpu_hours(load, cfg)
            for name, r in (("static peak " + "/".join(str(peak[s]) for s in STAGES), static), ("autoscaler", auto)):
                saved = 1 - r.gpu_hours / static.gpu_hours
                rows.append(f"| {kind} | {seed} | {name} | " + " | ".join(f"{r.stage_gpu_hours[s]:.0f}" for s in STAGES)
                            + f" | {r.gpu_hours:.0f} | {r.attainment:.4f} | {r.changes} | {100 * saved:.1f} % |")
            rows.append(f"| {kind} | {seed} | oracle (per-minute ceil, instant) | | | | {oracle:.0f} | | | "
                        f"{100 * (1 - oracle / static.gpu_hours):.1f} % |")
            print(f"[{kind} seed {seed}: {load.requests.sum():.0f} requests, {time.perf_counter() - t0:.1f}s]",
                  flush=True)
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/servegen_mm_image")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    np.seterr(all="ignore")
    print(run(args.data, args.seeds))


if __name__ == "__main__":
    main()
