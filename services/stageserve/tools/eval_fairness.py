"""`stageserve eval fairness`: replay a multi-tenant trace against the throttler policies in simulated time.

Every policy runs the same `Throttle` state machine the throttler service runs (policy/fairness/throttle.py)
in front of a capacity model of one engine, stepped every `step_s` seconds of simulated time:
- at most `max_running` calls and `kv_tokens` reserved tokens (prompt + output) in the engine (the throttle's
  capacity); prefill computes up to `prefill_budget` prompt tokens per step (FIFO, chunked); every decoding
  call produces one token per step; output is reported to the throttle token by token;
- overload (for OIT) from the model's KV usage and queued prefill tokens (engine + throttle queue), with the
  throttler's thresholds;
- a rejected call is dropped; when it was call k > 0 of an interaction, the interaction is cut: its earlier
  calls' tokens are wasted and its remaining calls never arrive. Call k+1 of an interaction arrives
  `think_s` after call k finished.

Traces:
- `vtc`: ../shared/data/vtc_real_trace/vtc_real_trace.csv (27 tenants, 600 s; one call per interaction,
  one app, no system prompt).
- `multiapp`: built from the Azure LLM inference traces 2023 (`build_multiapp`): three apps with different
  shapes: `code` (code trace rows; 1024-token system prompt, short outputs), `chat` (even conv rows;
  128-token system prompt) and `agent` (odd conv rows grouped into interactions of 2-5 calls, 512-token
  system prompt, each later call's input = previous input + previous output). Users per app: one heavy user
  takes `heavy_share` of the app's rows, the rest are spread uniformly over the other users.
Metrics (papers.md §3.5): per window of `window_s`, among users backlogged at every step of it, the service
gap (max - min) and Jain's index, in raw weighted tokens (w_in·(in+sys) + w_out·out) and normalised by
the app's mean cost per call (stage-wise); throttled interactions, rejections while not overloaded, cut
interactions, wasted tokens; per-user e2e latency p50/p99; throughput relative to FCFS.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import heapq
import json
import math
import random
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stageserve.policy.fairness.oit import AppLimits, OverloadThresholds, fit_limits, percentile_of, window_counts
from stageserve.policy.fairness.rpm import RPMConfig
from stageserve.policy.fairness.throttle import POLICIES, Throttle, ThrottleConfig
from stageserve.policy.fairness.types import Admit, Call, EngineLoad, Reject
from stageserve.policy.fairness.wsc import WSCConfig

DATA = Path("../shared/data")
VTC_TRACE = DATA / "vtc_real_trace" / "vtc_real_trace.csv"
AZURE = DATA / "azure_llm_2023"


# ---- traces -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallSpec:
    input_tokens: int
    system_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Interaction:
    iid: str
    user: str
    app: str
    start: float
    calls: tuple[CallSpec, ...]


def load_vtc(path: Path = VTC_TRACE, duration_s: float | None = None) -> list[Interaction]:
    out = []
    with open(path) as f:
        for row in csv.DictReader(f):
            t = float(row["req_time_s"])
            if duration_s is not None and t >= duration_s:
                continue
            spec = CallSpec(int(row["prompt_len"]), 0, max(1, int(row["output_len"])))
            out.append(Interaction(f"vtc-{row['req_id']}", row["tenant"], "chat", t, (spec,)))
    return out


def _azure_rows(path: Path, duration_s: float) -> list[tuple[float, int, int]]:
    rows: list[tuple[float, int, int]] = []
    t0: dt.datetime | None = None
    with open(path) as f:
        for row in csv.DictReader(f):
            ts = dt.datetime.fromisoformat(row["TIMESTAMP"][:26])
            t0 = t0 or ts
            t = (ts - t0).total_seconds()
            if t >= duration_s:
                break
            rows.append((t, int(row["ContextTokens"]), max(1, int(row["GeneratedTokens"]))))
    return rows


APPS = {  # app -> (system prompt tokens, users, trace)
    "code": (1024, 8, "code"),
    "chat": (128, 10, "conv"),
    "agent": (512, 6, "conv"),
}


def build_multiapp(
    duration_s: float = 300.0, sample: float = 0.35, heavy_share: float = 0.4, seed: int = 0, root: Path = AZURE
) -> list[Interaction]:
    """The multi-app trace (see the module docstring); `sample` keeps that fraction of the rows."""
    rng = random.Random(seed)
    code = _azure_rows(root / "AzureLLMInferenceTrace_code.csv", duration_s)
    conv = _azure_rows(root / "AzureLLMInferenceTrace_conv.csv", duration_s)
    rows = {"code": code, "chat": conv[0::2], "agent": conv[1::2]}
    out: list[Interaction] = []
    for app, (system, n_users, _) in APPS.items():
        kept = [r for r in rows[app] if rng.random() < sample]
        i = 0
        while i < len(kept):
            user = _pick_user(rng, app, n_users, heavy_share)
            n = rng.randint(2, 5) if app == "agent" else 1
            group = kept[i : i + n]
            i += n
            out.append(Interaction(f"{app}-{len(out)}", user, app, group[0][0], _calls(group, system)))
    return sorted(out, key=lambda x: x.start)


def _pick_user(rng: random.Random, app: str, n_users: int, heavy_share: float) -> str:
    if rng.random() < heavy_share:
        return f"{app}-u0"
    return f"{app}-u{rng.randint(1, n_users - 1)}"


def _calls(group: list[tuple[float, int, int]], system: int) -> tuple[CallSpec, ...]:
    calls: list[CallSpec] = []
    prev = 0
    for _, ctx, out in group:
        sys_tokens = min(system, max(0, ctx - 1))
        inp = max(1, ctx - sys_tokens) + prev
        calls.append(CallSpec(min(inp, 4096), sys_tokens, min(out, 1024)))
        prev = calls[-1].input_tokens + calls[-1].output_tokens if len(group) > 1 else 0
    return tuple(calls)


def load_trace(name: str, duration_s: float, sample: float, seed: int) -> list[Interaction]:
    if name == "vtc":
        return load_vtc(duration_s=duration_s)
    if name == "multiapp":
        return build_multiapp(duration_s=duration_s, sample=sample, seed=seed)
    raise ValueError(f"--trace: unknown trace {name!r} (vtc, multiapp)")


# ---- capacity model and simulation ----------------------------------------------------------------------
@dataclass(frozen=True)
class SimConfig:
    step_s: float = 0.04
    max_running: int = 24
    kv_tokens: int = 65536
    prefill_budget: int = 2048
    think_s: float = 0.5
    window_s: float = 10.0
    w_in: float = 1.0
    w_sys: float = 1.0
    w_out: float = 2.0
    percentile: float = 90.0  # OIT limits and the RPM limit: this percentile of per-minute history rates
    drain_s: float = 600.0  # after the last arrival, run at most this long to finish the queue
    wsc_delta: float | None = 1.0
    ewma_alpha: float = 0.02


@dataclass
class Live:
    call: Call
    spec: CallSpec
    interaction: Interaction
    arrival: float
    prefill_left: int
    output: int = 0
    first_token: float | None = None


@dataclass
class Result:
    policy: str
    calls_done: int = 0
    output_tokens: int = 0
    sim_time_s: float = 0.0
    throttled_interactions: int = 0
    rejections_not_overloaded: int = 0
    cut_interactions: int = 0
    wasted_tokens: int = 0
    overloaded_steps: int = 0
    steps: int = 0
    gaps_raw: list[float] = field(default_factory=list)
    gaps_norm: list[float] = field(default_factory=list)
    jain_raw: list[float] = field(default_factory=list)
    jain_norm: list[float] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # user -> e2e
    app_latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    interaction_latency: list[float] = field(default_factory=list)
    bound_raw: float = 0.0
    throttled_by_app: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    busy_steps: int = 0  # steps with a non-empty throttle queue
    busy_util: float = 0.0  # sum over those steps of max(running / max_running, reserved / kv_tokens)


def expected_costs(trace: Iterable[Interaction], c: SimConfig) -> dict[tuple[str, int], float]:
    """Mean weighted cost per (app, call stage) over the trace: the normaliser of the normalised service."""
    sums: dict[tuple[str, int], list[float]] = defaultdict(list)
    for it in trace:
        for k, s in enumerate(it.calls):
            sums[it.app, k].append(c.w_in * s.input_tokens + c.w_sys * s.system_tokens + c.w_out * s.output_tokens)
    return {key: statistics.fmean(v) for key, v in sums.items()}


def history_limits(trace: list[Interaction], c: SimConfig) -> tuple[dict[str, AppLimits], int]:
    """OIT limits (per app) and the RPM per-user limit, both the `percentile` of per-minute history rates."""
    starts = [(it.user, it.app, it.start) for it in trace]
    limits = fit_limits(starts, percentile=c.percentile, slack=1.0)
    per_user: dict[str, list[float]] = defaultdict(list)
    for it in trace:
        per_user[it.user].extend(it.start + k * 2.0 for k in range(len(it.calls)))  # calls spread out
    samples = [n for times in per_user.values() for n in window_counts(times)]
    rpm = max(1, math.ceil(percentile_of(samples, c.percentile)))
    return limits, rpm


def simulate(policy: str, trace: list[Interaction], c: SimConfig) -> Result:
    limits, rpm = history_limits(trace, c)
    tcfg = ThrottleConfig(
        policy=policy,
        max_running_calls=c.max_running,
        max_running_tokens=c.kv_tokens,
        batch_token_budget=c.prefill_budget,
        overload=OverloadThresholds(),
        limits=limits,
        rpm=RPMConfig(user_rpm=rpm),
        wsc=WSCConfig(w_in=c.w_in, w_sys=c.w_sys, w_out=c.w_out, delta=c.wsc_delta, ewma_alpha=c.ewma_alpha),
    )
    throttle = Throttle(tcfg)
    return _Sim(throttle, trace, c).run()


class _Sim:
    def __init__(self, throttle: Throttle, trace: list[Interaction], c: SimConfig) -> None:
        self.t = throttle
        self.c = c
        self.res = Result(throttle.name)
        self.costs = expected_costs(trace, c)
        self.arrivals: list[tuple[float, int, Interaction, int]] = [(it.start, i, it, 0) for i, it in enumerate(trace)]
        heapq.heapify(self.arrivals)
        self.seq = len(trace)
        self.live: dict[str, Live] = {}
        self.prefill_queue: list[str] = []
        self.spent: dict[str, int] = defaultdict(int)  # interaction -> tokens processed so far
        self.last_arrival = max((it.start for it in trace), default=0.0)
        max_in = max((s.input_tokens + s.system_tokens for it in trace for s in it.calls), default=0)
        self.res.bound_raw = 2 * max(c.w_in * max_in, c.w_out * c.kv_tokens)
        self.window_service_raw: dict[str, float] = defaultdict(float)
        self.window_service_norm: dict[str, float] = defaultdict(float)
        self.window_backlog: dict[str, int] = defaultdict(int)
        self.window_steps = 0
        self.step_tokens = 0

    def run(self) -> Result:
        step = 0
        while True:
            now = step * self.c.step_s
            if now > self.last_arrival + self.c.drain_s:
                break
            if not self.arrivals and not self.live and not self.t.queued:
                break
            self._arrive(now)
            self._start_dispatched(now)
            self._engine_step(now)
            self._observe(now)
            step += 1
        self.res.steps = step
        self.res.sim_time_s = step * self.c.step_s
        return self.res

    # ---- arrivals and admission -------------------------------------------------------------------
    def _arrive(self, now: float) -> None:
        while self.arrivals and self.arrivals[0][0] <= now:
            at, _, it, k = heapq.heappop(self.arrivals)
            spec = it.calls[k]
            call = Call(f"{it.iid}#{k}", it.user, it.app, it.iid, k, spec.input_tokens, spec.system_tokens,
                        spec.output_tokens, at)
            decision = self.t.admit(call, now)
            if isinstance(decision, Reject):
                self._rejected(it, k)
                continue
            self.live[call.request_id] = Live(call, spec, it, at, spec.input_tokens + spec.system_tokens)
            if isinstance(decision, Admit):
                self.prefill_queue.append(call.request_id)

    def _rejected(self, it: Interaction, k: int) -> None:
        r = self.res
        r.throttled_interactions += 1 if k == 0 else 0
        r.throttled_by_app[it.app] += 1
        if not self.t.overloaded:
            r.rejections_not_overloaded += 1
        if k > 0:
            r.cut_interactions += 1
            r.wasted_tokens += self.spent.pop(it.iid, 0)

    def _start_dispatched(self, now: float) -> None:
        for call in self.t.take_started():
            self.prefill_queue.append(call.request_id)

    # ---- the engine -------------------------------------------------------------------------------
    def _engine_step(self, now: float) -> None:
        budget = self.c.prefill_budget
        self.step_tokens = 0
        done_prefill = []
        for rid in self.prefill_queue:
            if budget <= 0:
                break
            live = self.live[rid]
            chunk = min(budget, live.prefill_left)
            live.prefill_left -= chunk
            budget -= chunk
            self.step_tokens += chunk
            if live.prefill_left == 0:
                done_prefill.append(rid)
                s = live.spec
                self._serve(live, self.c.w_in * s.input_tokens + self.c.w_sys * s.system_tokens)
                self.spent[live.interaction.iid] += s.input_tokens + s.system_tokens
        for rid in done_prefill:
            self.prefill_queue.remove(rid)
        decoding = [lv for lv in self.live.values() if lv.call.request_id in self.t.running and lv.prefill_left == 0]
        for live in decoding:
            if live.call.request_id in done_prefill:
                continue  # first token comes on the next step
            live.output += 1
            self.step_tokens += 1
            live.first_token = live.first_token if live.first_token is not None else now
            self.spent[live.interaction.iid] += 1
            self._serve(live, self.c.w_out)
            self.t.report_tokens(live.call.request_id, live.output, now)
            if live.output >= live.spec.output_tokens:
                self._finish(live, now)

    def _finish(self, live: Live, now: float) -> None:
        rid = live.call.request_id
        del self.live[rid]
        self.t.release(rid, live.output, now)
        r = self.res
        r.calls_done += 1
        r.output_tokens += live.output
        r.latency[live.call.user].append(now - live.arrival)
        r.app_latency[live.call.app].append(now - live.arrival)
        it, k = live.interaction, live.call.call_index
        if k + 1 < len(it.calls):
            heapq.heappush(self.arrivals, (now + self.c.think_s, self.seq, it, k + 1))
            self.seq += 1
        else:
            self.spent.pop(it.iid, None)
            if len(it.calls) > 1:
                r.interaction_latency.append(now - it.start)

    def _serve(self, live: Live, raw: float) -> None:
        user = live.call.user
        self.window_service_raw[user] += raw
        norm = self.costs.get((live.call.app, live.call.call_index), 1.0)
        self.window_service_norm[user] += raw / norm

    # ---- load and metrics -------------------------------------------------------------------------
    def _observe(self, now: float) -> None:
        reserved = sum(lv.spec.input_tokens + lv.spec.system_tokens + lv.spec.output_tokens
                       for lv in self.live.values() if lv.call.request_id in self.t.running)
        queued_prefill = sum(self.live[rid].prefill_left for rid in self.prefill_queue)
        self.t.observe_load(EngineLoad(reserved / self.c.kv_tokens, queued_prefill, self.c.prefill_budget), now)
        self.res.overloaded_steps += int(self.t.overloaded)
        if self.t.queued:
            self.res.busy_steps += 1
            running = len(self.t.running) / self.c.max_running
            self.res.busy_util += max(running, reserved / self.c.kv_tokens)
        for user in {c.user for c in self.t.queued.values()}:
            self.window_backlog[user] += 1
        self.window_steps += 1
        if self.window_steps * self.c.step_s >= self.c.window_s - 1e-9:
            self._close_window()

    def _close_window(self) -> None:
        users = [u for u, n in self.window_backlog.items() if n == self.window_steps]
        if len(users) >= 2:
            for service, gaps, jains in (
                (self.window_service_raw, self.res.gaps_raw, self.res.jain_raw),
                (self.window_service_norm, self.res.gaps_norm, self.res.jain_norm),
            ):
                xs = [service.get(u, 0.0) for u in users]
                gaps.append(max(xs) - min(xs))
                jains.append(jain(xs))
        self.window_service_raw.clear()
        self.window_service_norm.clear()
        self.window_backlog.clear()
        self.window_steps = 0


def jain(xs: list[float]) -> float:
    total, sq = sum(xs), sum(x * x for x in xs)
    return 1.0 if sq == 0 else total * total / (len(xs) * sq)


# ---- reporting --------------------------------------------------------------------------------------------
def summary(r: Result, fcfs_throughput: float | None) -> dict[str, float | int | str]:
    p50s = [percentile_of(v, 50) for v in r.latency.values() if v]
    p99s = [percentile_of(v, 99) for v in r.latency.values() if v]
    throughput = r.output_tokens / r.sim_time_s if r.sim_time_s else 0.0
    return {
        "policy": r.policy,
        "gap_raw_max": max(r.gaps_raw, default=0.0),
        "gap_raw_mean": statistics.fmean(r.gaps_raw) if r.gaps_raw else 0.0,
        "gap_norm_max": max(r.gaps_norm, default=0.0),
        "gap_norm_mean": statistics.fmean(r.gaps_norm) if r.gaps_norm else 0.0,
        "jain_raw": statistics.fmean(r.jain_raw) if r.jain_raw else 1.0,
        "jain_norm": statistics.fmean(r.jain_norm) if r.jain_norm else 1.0,
        "windows": len(r.gaps_raw),
        "vtc_bound_raw": r.bound_raw,
        "throttled_interactions": r.throttled_interactions,
        "rejections_not_overloaded": r.rejections_not_overloaded,
        "cut_interactions": r.cut_interactions,
        "wasted_tokens": r.wasted_tokens,
        "calls_done": r.calls_done,
        "user_p50_median_s": statistics.median(p50s) if p50s else 0.0,
        "user_p99_max_s": max(p99s, default=0.0),
        "agent_interaction_p50_s": percentile_of(r.interaction_latency, 50) if r.interaction_latency else 0.0,
        "throughput_tok_s": throughput,
        "throughput_vs_fcfs": throughput / fcfs_throughput if fcfs_throughput else 1.0,
        "util_under_backlog": r.busy_util / r.busy_steps if r.busy_steps else 1.0,
        "overloaded_frac": r.overloaded_steps / r.steps if r.steps else 0.0,
    }


COLUMNS = [
    ("policy", "policy", "{}"),
    ("gap_raw_max", "max gap (raw)", "{:.0f}"),
    ("gap_raw_mean", "mean gap (raw)", "{:.0f}"),
    ("gap_norm_max", "max gap (norm)", "{:.2f}"),
    ("gap_norm_mean", "mean gap (norm)", "{:.2f}"),
    ("jain_raw", "Jain (raw)", "{:.3f}"),
    ("jain_norm", "Jain (norm)", "{:.3f}"),
    ("throttled_interactions", "throttled inter.", "{}"),
    ("rejections_not_overloaded", "rejects w/o overload", "{}"),
    ("cut_interactions", "cut mid-way", "{}"),
    ("wasted_tokens", "wasted tokens", "{}"),
    ("user_p50_median_s", "user p50 (median, s)", "{:.1f}"),
    ("user_p99_max_s", "user p99 (worst, s)", "{:.1f}"),
    ("agent_interaction_p50_s", "agent inter. p50 (s)", "{:.1f}"),
    ("util_under_backlog", "util. w/ backlog", "{:.3f}"),
    ("throughput_vs_fcfs", "out tok/s / FCFS", "{:.3f}"),
]


def markdown(rows: list[dict[str, float | int | str]]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def evaluate(trace_name: str, policies: list[str], c: SimConfig, duration_s: float, sample: float, seed: int
             ) -> list[dict[str, float | int | str]]:
    trace = load_trace(trace_name, duration_s, sample, seed)
    results = {p: simulate(p, trace, c) for p in policies}
    fcfs = results.get("fcfs")
    base = fcfs.output_tokens / fcfs.sim_time_s if fcfs and fcfs.sim_time_s else None
    return [summary(r, base) for r in results.values()]


# ---- command line -----------------------------------------------------------------------------------------
def add_eval_fairness_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fairness", help="replay a multi-tenant trace against the throttler policies (simulated)")
    p.add_argument("--trace", choices=("vtc", "multiapp"), default="vtc")
    p.add_argument("--policies", default="fcfs,rpm,vtc,fairserve", help="comma list of " + ", ".join(POLICIES))
    p.add_argument("--duration", type=float, default=None, help="seconds of trace (default: vtc 600, multiapp 300)")
    p.add_argument("--sample", type=float, default=1.0, help="multiapp: fraction of the Azure rows kept")
    p.add_argument("--seed", type=int, default=0)
    d = SimConfig()
    p.add_argument("--max-running", type=int, default=d.max_running, help="capacity: calls in the engine")
    p.add_argument("--kv-tokens", type=int, default=d.kv_tokens, help="capacity: reserved tokens in the engine")
    p.add_argument("--prefill-budget", type=int, default=d.prefill_budget, help="prompt tokens per engine step")
    p.add_argument("--step-s", type=float, default=d.step_s, help="simulated seconds per engine step")
    p.add_argument("--window-s", type=float, default=d.window_s, help="fairness measurement window")
    p.add_argument("--percentile", type=float, default=d.percentile, help="OIT/RPM limits from history rates")
    p.add_argument("--wsc-delta", type=float, default=d.wsc_delta, help="WSC continuation slack; <0: max charge")
    p.add_argument("--ewma-alpha", type=float, default=d.ewma_alpha)
    p.add_argument("--json", default=None, help="also write the summaries to this file")
    p.add_argument("--live", default=None, metavar="URL",
                   help="replay against a running pipeline's OpenAI API (e.g. http://127.0.0.1:8000/v1) instead")
    p.add_argument("--speedup", type=float, default=10.0, help="--live: trace time runs this much faster")
    p.add_argument("--token-scale", type=float, default=0.02, help="--live: multiplies every token count")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    unknown = [x for x in policies if x not in POLICIES]
    if unknown:
        raise ValueError(f"--policies: unknown policy {unknown[0]!r} (known: {', '.join(POLICIES)})")
    c = SimConfig(
        step_s=args.step_s, max_running=args.max_running, kv_tokens=args.kv_tokens, prefill_budget=args.prefill_budget,
        window_s=args.window_s, percentile=args.percentile,
        wsc_delta=None if args.wsc_delta < 0 else args.wsc_delta, ewma_alpha=args.ewma_alpha,
    )
    duration = args.duration or (600.0 if args.trace == "vtc" else 300.0)
    if args.live:
        return _run_live(args, duration)
    print(f"trace {args.trace}: {duration:.0f} s, sample {args.sample}; capacity {c.max_running} calls, "
          f"{c.kv_tokens} KV tokens, {c.prefill_budget} prefill tokens / {c.step_s} s step", file=sys.stderr)
    rows = evaluate(args.trace, policies, c, duration, args.sample, args.seed)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _run_live(args: argparse.Namespace, duration: float) -> int:
    """One replay against the running pipeline: the policy is whatever its throttler is configured with."""
    import asyncio

    from stageserve.tools.eval_fairness_live import replay

    trace = load_trace(args.trace, duration, args.sample, args.seed)
    print(f"live: {len(trace)} interactions over {duration / args.speedup:.0f} s against {args.live}", file=sys.stderr)
    result = asyncio.run(replay(args.live.rstrip("/"), trace, args.speedup, args.token_scale, 600.0)).summary()
    print("| " + " | ".join(result) + " |\n|" + "---|" * len(result))
    print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in result.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
