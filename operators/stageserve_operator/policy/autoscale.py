"""Token-aware autoscaling per stage (ModServe §4.2): replicas = ceil(load tokens/s ÷ capacity at SLO).

Unit of load: tokens per second the stage must process. Inputs per stage (``StageLoad``):
- encoder: image tokens/s plus the pending image-token backlog drained within ``drain_s``;
- prefill: prompt tokens/s (text + image tokens for decoder-only models) plus the waiting backlog;
- decode: generation tokens/s, and also running sequences vs ``max_seqs_per_replica`` and KV usage vs
  ``kv_target`` (the largest of the three wins).

Timing: a plan is made every ``replan_interval_s``, or at once when the P99 SLO attainment (share of
requests meeting the TTFT/ITL target in the metrics window) falls below ``slo_target``. Scale-up is
immediate (subject to ``cooldown_s`` except on an SLO breach); for ``settle_s`` after a scale-up only the
arrival rate can add replicas, since the backlog and the attainment have not yet felt the new ones.
Scale-down waits until every plan during ``scale_down_window_s`` recommended fewer replicas, goes to the
largest of those recommendations, and removes at most ``max_scale_down_fraction`` of the replicas per
step. Bounds: ``min_replicas`` <= replicas <= ``max_replicas``. Time is always an argument (seconds, any
monotonic origin); the module keeps no state: ``plan`` returns the new ``ScaleState``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

STAGE_KINDS = ("encoder", "prefill", "decode")


@dataclass(frozen=True)
class StageLoad:
    """What the metrics say about one stage, summed over its replicas (rates over the metrics window)."""

    tokens_per_s: float = 0.0  # encoder: image tokens/s; prefill: prompt tokens/s; decode: generation tokens/s
    pending_tokens: float = 0.0  # backlog not yet served (encoder pending image tokens, prefill waiting tokens)
    running_seqs: float = 0.0  # decode: sequences resident
    kv_usage: float = 0.0  # decode: mean KV cache usage in [0, 1]
    slo_attainment: float | None = None  # share of requests meeting the stage's SLO; None = no traffic


@dataclass(frozen=True)
class ScalePolicy:
    """How one stage scales. ``capacity_tokens_per_s`` is the most one replica carries within the SLO."""

    capacity_tokens_per_s: float
    min_replicas: int = 1
    max_replicas: int = 8
    replan_interval_s: float = 300.0
    scale_down_window_s: float = 900.0
    cooldown_s: float = 60.0
    max_scale_down_fraction: float = 0.25
    slo_target: float = 0.99
    drain_s: float = 300.0  # the backlog should be gone within this (one re-plan interval)
    kv_target: float = 0.8
    max_seqs_per_replica: int = 0  # 0 = not a limit
    settle_s: float = 240.0  # after a scale-up, backlog and SLO wait this long (start-up + metrics window)

    def __post_init__(self) -> None:
        if not self.capacity_tokens_per_s > 0:
            raise ValueError(f"capacity_tokens_per_s: must be > 0, got {self.capacity_tokens_per_s}")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas/max_replicas: need 0 <= min <= max, got {self.min_replicas}, "
                             f"{self.max_replicas}")
        if not 0 < self.max_scale_down_fraction <= 1:
            raise ValueError("max_scale_down_fraction: must be in (0, 1]")
        for name in ("replan_interval_s", "scale_down_window_s", "cooldown_s", "drain_s", "settle_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")


@dataclass(frozen=True)
class ScaleState:
    """The autoscaler's memory for one stage between plans."""

    replicas: int
    last_plan_at: float | None = None
    last_change_at: float | None = None
    below_since: float | None = None  # first plan of the current run of plans that all wanted fewer replicas
    below_max: int = 0  # the largest recommendation in that run
    scaled_up_at: float | None = None  # last scale-up: its replicas may still be starting


@dataclass(frozen=True)
class Decision:
    replicas: int  # what the stage should run now
    recommended: int  # ceil(load / capacity) within bounds, before hysteresis
    reason: str
    planned: bool  # False: not due (no re-plan tick and no SLO breach)
    state: ScaleState


def recommend(
    stage: str, load: StageLoad, current: int, policy: ScalePolicy, settling: bool = False
) -> tuple[int, str]:
    """Replicas the load needs right now (bounded), and which signal decided it.

    ``settling``: replicas from the last scale-up may still be starting, so the backlog and the SLO
    attainment (which they have not had a chance to improve) are left out; the arrival rate still counts.
    """
    if stage not in STAGE_KINDS:
        raise ValueError(f"stage: autoscaling covers {', '.join(STAGE_KINDS)}, got {stage!r}")
    cap = policy.capacity_tokens_per_s
    backlog = load.pending_tokens / policy.drain_s if policy.drain_s > 0 and not settling else 0.0
    tokens = load.tokens_per_s + (backlog if stage in ("encoder", "prefill") else 0.0)
    candidates = {"tokens": math.ceil(round(tokens / cap, 9))}
    if stage == "decode":
        if policy.max_seqs_per_replica > 0:
            candidates["running sequences"] = math.ceil(round(load.running_seqs / policy.max_seqs_per_replica, 9))
        if load.kv_usage > 0 and current > 0:
            candidates["KV usage"] = math.ceil(round(current * load.kv_usage / policy.kv_target, 9))
    signal = max(candidates, key=lambda k: candidates[k])
    wanted = candidates[signal]
    if slo_breached(load, policy) and wanted <= current and not settling:
        wanted, signal = current + 1, "SLO attainment"
    bounded = min(max(wanted, policy.min_replicas), policy.max_replicas)
    detail = f"{signal}: {tokens:.0f} tok/s over {cap:g} tok/s per replica" if signal == "tokens" else signal
    if bounded != wanted:
        detail += f" (bounded to [{policy.min_replicas}, {policy.max_replicas}])"
    return bounded, detail


def slo_breached(load: StageLoad, policy: ScalePolicy) -> bool:
    return load.slo_attainment is not None and load.slo_attainment < policy.slo_target


def plan(stage: str, load: StageLoad, state: ScaleState, now: float, policy: ScalePolicy) -> Decision:
    """One autoscaling step for ``stage`` at time ``now``; returns the replicas to run and the new state."""
    current = state.replicas
    breach = slo_breached(load, policy)
    due = state.last_plan_at is None or now - state.last_plan_at >= policy.replan_interval_s
    if not due and not breach:
        wait = policy.replan_interval_s - (now - (state.last_plan_at or now))
        return Decision(current, current, f"holding: next re-plan in {wait:.0f}s", False, state)
    settling = state.scaled_up_at is not None and now - state.scaled_up_at < policy.settle_s
    wanted, why = recommend(stage, load, current, policy, settling)
    if breach:
        why = f"SLO attainment {load.slo_attainment:.3f} < {policy.slo_target}; {why}"
    if settling:
        why = f"{why} (settling: backlog and SLO wait {policy.settle_s:g}s for started replicas)"
    planned = replace(state, last_plan_at=now)
    in_cooldown = state.last_change_at is not None and now - state.last_change_at < policy.cooldown_s
    if wanted > current:
        planned = replace(planned, below_since=None, below_max=0)
        if in_cooldown and not breach:
            return Decision(current, wanted, f"cooldown: wants {wanted} ({why})", True, planned)
        up = replace(_changed(planned, wanted, now), scaled_up_at=now)
        return Decision(wanted, wanted, f"scale up to {wanted}: {why}", True, up)
    if wanted == current:
        planned = replace(planned, below_since=None, below_max=0)
        return Decision(current, wanted, f"steady: {why}", True, planned)
    return _scale_down(wanted, why, planned, now, policy)


def _scale_down(wanted: int, why: str, state: ScaleState, now: float, policy: ScalePolicy) -> Decision:
    current = state.replicas
    since = state.below_since if state.below_since is not None else now
    peak = max(state.below_max, wanted) if state.below_since is not None else wanted
    state = replace(state, below_since=since, below_max=peak)
    waited = now - since
    if waited < policy.scale_down_window_s:
        left = policy.scale_down_window_s - waited
        return Decision(current, wanted, f"stabilising: wants {wanted}, {left:.0f}s of window left", True, state)
    if state.last_change_at is not None and now - state.last_change_at < policy.cooldown_s:
        return Decision(current, wanted, f"cooldown: wants {wanted}", True, state)
    step_floor = current - max(1, math.floor(current * policy.max_scale_down_fraction))
    target = max(peak, step_floor, policy.min_replicas)
    changed = _changed(state, target, now)
    if peak >= target:  # the whole run of low plans is satisfied: start a fresh window
        changed = replace(changed, below_since=None, below_max=0)
    return Decision(target, wanted, f"scale down to {target} after {waited:.0f}s below: {why}", True, changed)


def _changed(state: ScaleState, replicas: int, now: float) -> ScaleState:
    return replace(state, replicas=replicas, last_change_at=now)
