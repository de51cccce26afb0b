"""Trace-driven simulation of the autoscaler against static provisioning (ModServe §4.2 evaluation).

``servegen_load`` turns a ServeGen multimodal day (``../shared/data/servegen_mm_image``: per client chunk,
one row per 10-minute window with the request rate and the inter-arrival distribution, plus token-count
distributions every 6 hours) into per-second load per stage: image tokens (encoder), prompt tokens
(prefill: text + image for decoder-only models, text only for cross-attention models) and generation
tokens (decode: each request emits its output tokens at ``decode_tok_per_seq_s`` tokens/s per sequence).

``simulate`` replays that load second by second through a fluid-queue capacity model: each replica
serves ``capacity × headroom`` tokens/s (``capacity`` is the most load it carries within the SLO; beyond
it the latency grows until saturation at ``headroom × capacity``). A request meets its SLO when the
queueing delay it sees is within the slack (encoder + prefill delay for TTFT, decode delay for ITL). New
replicas serve only after ``startup_s``. Every ``tick_s`` the autoscaler (the operator's pure ``plan``)
sees the last ``window_s`` of load, the backlog and the SLO attainment, as it would from Prometheus.
"""

from __future__ import annotations

import ast
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stageserve_operator.policy.autoscale import ScalePolicy, ScaleState, StageLoad, plan

STAGES = ("encoder", "prefill", "decode")
DAY_S = 86400
WINDOW_S = 600


@dataclass(frozen=True)
class StageTrace:
    tokens: np.ndarray  # tokens arriving (encoder/prefill) or to generate (decode) per second
    requests: np.ndarray  # requests arriving per second (weights for attainment)


@dataclass(frozen=True)
class DayLoad:
    stages: dict[str, StageTrace]
    requests: np.ndarray  # all requests per second

    @property
    def seconds(self) -> int:
        return len(self.requests)


def _sample(rng: np.random.Generator, text: str, n: int) -> np.ndarray:
    """n draws from a ServeGen ``{value: probability}`` distribution string."""
    d = ast.literal_eval(text)
    values = np.array(list(d.keys()), dtype=float)
    probs = np.array(list(d.values()), dtype=float)
    return rng.choice(values, size=n, p=probs / probs.sum())


def _arrivals(rows: list[list[str]], rng: np.random.Generator, seconds: int) -> np.ndarray:
    """Arrival times (s) from per-window rate and inter-arrival distribution (Gamma/Weibull/else Poisson)."""
    times = []
    for row in rows:
        start, rate = float(row[0]), float(row[1])
        if start >= seconds or rate <= 0:
            continue
        dist, p1, p2 = row[3], float(row[4]), float(row[5])
        n = max(8, int(rate * WINDOW_S * 2) + 8)
        if dist == "Gamma":
            gaps = rng.gamma(p1, p2, n)
        elif dist == "Weibull":
            gaps = rng.weibull(p1, n) * p2
        else:
            gaps = rng.exponential(1.0 / rate, n)
        gaps *= (1.0 / rate) / max(gaps.mean(), 1e-9)  # keep the window's mean rate exact
        t = start + np.cumsum(gaps) - gaps[0] * rng.random()
        times.append(t[t < start + WINDOW_S])
    return np.concatenate(times) if times else np.zeros(0)


def servegen_load(
    data_dir: str | Path,
    *,
    seconds: int = DAY_S,
    model_kind: str = "decOnly",
    decode_tok_per_seq_s: float = 25.0,
    seed: int = 0,
) -> DayLoad:
    """Per-second stage loads of one ServeGen day (every chunk = one client population, summed)."""
    data_dir = Path(data_dir)
    rng = np.random.default_rng(seed)
    enc = np.zeros(seconds)
    pre = np.zeros(seconds)
    dec_diff = np.zeros(seconds + 1)
    reqs = np.zeros(seconds)
    img_reqs = np.zeros(seconds)
    chunks = sorted(data_dir.glob("chunk-*-trace.csv"), key=lambda p: int(p.stem.split("-")[1]))
    if not chunks:
        raise FileNotFoundError(f"no chunk-*-trace.csv in {data_dir}")
    for trace in chunks:
        rows = list(csv.reader(trace.open()))
        dataset = json.loads(trace.with_name(trace.name.replace("trace.csv", "dataset.json")).read_text())
        keys = sorted(int(k) for k in dataset)
        t = _arrivals(rows, rng, seconds)
        if len(t) == 0:
            continue
        sec = np.minimum(t.astype(int), seconds - 1)
        period = np.searchsorted(keys, sec, side="right") - 1
        for p, key in enumerate(keys):
            mask = period == p
            n = int(mask.sum())
            if n == 0:
                continue
            d = dataset[str(key)]
            text = _sample(rng, d["text_tokens"], n)
            image = _sample(rng, d["image_tokens"], n)
            out = _sample(rng, d["output_tokens"], n)
            s = sec[mask]
            np.add.at(reqs, s, 1)
            np.add.at(img_reqs, s, (image > 0).astype(float))
            np.add.at(enc, s, image)
            np.add.at(pre, s, text + (image if model_kind == "decOnly" else 0))
            # decode: decode_tok_per_seq_s tokens/s from arrival until the output is done
            end = np.minimum(s + np.ceil(out / decode_tok_per_seq_s).astype(int), seconds)
            rate = np.where(end > s, out / np.maximum(end - s, 1), 0.0)
            np.add.at(dec_diff, s, rate)
            np.add.at(dec_diff, end, -rate)
    dec = np.cumsum(dec_diff)[:seconds]
    return DayLoad(
        stages={"encoder": StageTrace(enc, img_reqs), "prefill": StageTrace(pre, reqs),
                "decode": StageTrace(dec, reqs)},
        requests=reqs,
    )


@dataclass(frozen=True)
class SimConfig:
    capacity: dict[str, float]  # tokens/s per replica at the SLO
    min_replicas: int = 1
    max_replicas: int = 64
    headroom: float = 1.5  # saturation throughput / capacity at SLO
    ttft_slack_s: float = 5.0  # queueing delay a request tolerates before its first token misses the SLO
    itl_slack_s: float = 2.0  # decode backlog (in seconds of service) at which token gaps miss the SLO
    startup_s: int = 120  # a new replica serves after this long (pod start + weights)
    tick_s: int = 60  # the operator's timer
    window_s: int = 120  # the Prometheus rate() window
    replan_interval_s: float = 300.0
    scale_down_window_s: float = 900.0
    cooldown_s: float = 60.0
    slo_target: float = 0.99
    max_scale_down_fraction: float = 0.25

    drain_s: float = 300.0  # as the operator's defaults
    settle_s: float = 240.0  # start-up plus the rate window: until then metrics do not show new replicas

    def policy(self, stage: str) -> ScalePolicy:
        return ScalePolicy(self.capacity[stage], self.min_replicas, self.max_replicas, self.replan_interval_s,
                           self.scale_down_window_s, self.cooldown_s, self.max_scale_down_fraction,
                           self.slo_target, drain_s=self.drain_s, settle_s=self.settle_s)


@dataclass
class SimResult:
    gpu_hours: float
    attainment: float  # share of all requests meeting TTFT and ITL
    stage_gpu_hours: dict[str, float]
    replicas: dict[str, np.ndarray] = field(repr=False)  # per second, serving replicas
    changes: int = 0


def simulate(load: DayLoad, cfg: SimConfig, static: dict[str, int] | None = None) -> SimResult:
    """Replays ``load``; with ``static`` the replicas never change, else the autoscaler drives them."""
    n = load.seconds
    serving = {s: np.zeros(n, dtype=int) for s in STAGES}
    backlog = dict.fromkeys(STAGES, 0.0)
    delay = {s: np.zeros(n) for s in STAGES}
    states = {s: ScaleState((static or {}).get(s, cfg.min_replicas)) for s in STAGES}
    if static is None:  # initial size from the first window's load, as ModServe's bootstrap
        for s in STAGES:
            first = load.stages[s].tokens[: cfg.window_s].mean()
            states[s] = ScaleState(max(cfg.min_replicas, math.ceil(first / cfg.capacity[s])))
    target = {s: states[s].replicas for s in STAGES}
    pending: dict[str, list[tuple[int, int]]] = {s: [] for s in STAGES}  # (ready_at, replicas) scale-ups
    live = dict(target)
    changes = 0
    for t in range(n):
        for s in STAGES:
            while pending[s] and pending[s][0][0] <= t:
                live[s] = max(live[s], pending[s].pop(0)[1])
            mu = live[s] * cfg.capacity[s] * cfg.headroom
            backlog[s] = max(0.0, backlog[s] + load.stages[s].tokens[t] - mu)
            delay[s][t] = backlog[s] / mu if mu > 0 else math.inf
            serving[s][t] = live[s]
        if static is None and t % cfg.tick_s == cfg.tick_s - 1:
            lo = max(0, t + 1 - cfg.window_s)
            ok_ttft = (delay["encoder"][lo:t + 1] + delay["prefill"][lo:t + 1]) <= cfg.ttft_slack_s
            ok_itl = delay["decode"][lo:t + 1] <= cfg.itl_slack_s
            for s in STAGES:
                tr = load.stages[s]
                w = tr.requests[lo:t + 1]
                ok = ok_itl if s == "decode" else ok_ttft
                att = float((w * ok).sum() / w.sum()) if w.sum() > 0 else None
                obs = StageLoad(tokens_per_s=float(tr.tokens[lo:t + 1].mean()), pending_tokens=backlog[s],
                                slo_attainment=att)
                d = plan(s, obs, states[s], float(t), cfg.policy(s))
                states[s] = d.state
                if d.replicas != target[s]:
                    changes += 1
                    if d.replicas > target[s]:
                        pending[s].append((t + cfg.startup_s, d.replicas))
                    else:
                        live[s] = d.replicas  # drained and removed at once
                        pending[s] = [(r, min(k, d.replicas)) for r, k in pending[s]]
                    target[s] = d.replicas
    ok = ((delay["encoder"] + delay["prefill"]) <= cfg.ttft_slack_s) & (delay["decode"] <= cfg.itl_slack_s)
    attainment = float((load.requests * ok).sum() / max(load.requests.sum(), 1))
    # GPU time counts from the scale-up decision (a starting pod holds its GPU), so add the startup time back
    stage_hours = {s: float(serving[s].sum()) / 3600 for s in STAGES}
    if static is None:
        for s in STAGES:
            ups = np.diff(serving[s], prepend=serving[s][0])
            stage_hours[s] += float(ups[ups > 0].sum()) * cfg.startup_s / 3600
    return SimResult(sum(stage_hours.values()), attainment, stage_hours, serving, changes)


def peak_replicas(load: DayLoad, cfg: SimConfig, window_s: int = 60) -> dict[str, int]:
    """Static provisioning for the day's peak: ceil(max over ``window_s`` averages of load / capacity)."""
    out = {}
    for s in STAGES:
        tokens = load.stages[s].tokens
        k = len(tokens) // window_s
        avg = tokens[: k * window_s].reshape(k, window_s).mean(axis=1)
        out[s] = max(cfg.min_replicas, math.ceil(avg.max() / cfg.capacity[s]))
    return out
