"""Overload- and Interaction-driven Throttling (FairServe's admission; reconstructed, see papers.md §3.2).

What: admission at the granularity of INTERACTIONS. A call of an active interaction is always admitted
(the scheduler may queue it; OIT never rejects it). A new interaction is checked only while the engine is
overloaded, against interaction starts per (user, app) and per app in a sliding window (60 s); over a limit
it is rejected with retry_after = time until enough window entries expire (at least 1 s). Overload has
hysteresis: enter at kv_usage ≥ 0.90 or queued prefill ≥ 2× the batch token budget, leave only when
kv_usage < 0.80 and queued prefill < 1× budget. An interaction ends on `end_interaction` or after 120 s
without a call (`touch` keeps it alive while a long call runs). An unknown interaction id with
call_index > 0 (e.g. started before a throttler restart) is adopted as a continuation if call_index is
below the app's max calls per interaction; ids this OIT saw end are not unknown: a later call starts a new
interaction. Limits come from history via `fit_limits`.
Unit of fairness: interactions per (user, app) and per app, per minute.
Inputs: `Call.user/app/interaction_id/call_index`, `EngineLoad`, `now`.
Configuration: `OITConfig` (thresholds, window, idle time, retry floor, default calls-per-interaction
cap, limits for apps without fitted limits: unlimited by default); per-app `AppLimits`.
Trade-offs: no rejection ever happens without overload and no interaction is cut half-way, so no tokens
are wasted; the price is that admitted interactions can overshoot capacity (their later calls queue), and
that limits are only as good as the history they were fitted on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from stageserve.policy.fairness.types import Admit, Call, EngineLoad, Reject, SlidingWindow

NAME = "oit"

K = TypeVar("K")


@dataclass(frozen=True)
class OverloadThresholds:
    kv_enter: float = 0.90
    kv_leave: float = 0.80
    queue_enter: float = 2.0  # × batch_token_budget
    queue_leave: float = 1.0


@dataclass(frozen=True)
class AppLimits:
    """Interaction starts per minute; None = unlimited."""

    user_per_min: float | None = None
    app_per_min: float | None = None
    max_calls_per_interaction: int | None = None


@dataclass(frozen=True)
class OITConfig:
    overload: OverloadThresholds = OverloadThresholds()
    window_s: float = 60.0
    idle_s: float = 120.0
    min_retry_after_s: float = 1.0
    max_calls_per_interaction: int = 32
    default_limits: AppLimits = AppLimits()
    forget_ended_s: float = 3600.0


@dataclass
class AppStats:
    calls: int = 0
    new_interactions: int = 0
    adopted_interactions: int = 0
    continuation_calls: int = 0
    throttled_interactions: int = 0


@dataclass
class Interaction:
    user: str
    app: str
    started: float
    last_seen: float
    calls: int = 1


@dataclass(frozen=True)
class OITState:
    active: dict[str, tuple[str, str, float]]  # interaction id -> (user, app, last seen)
    ended: list[str]
    user_app: dict[tuple[str, str], list[float]]  # interaction start times in the window
    app: dict[str, list[float]]


class OverloadDetector:
    """Overloaded / not, with hysteresis between the enter and leave thresholds."""

    def __init__(self, thresholds: OverloadThresholds | None = None) -> None:
        self.thresholds = thresholds or OverloadThresholds()
        self.overloaded = False
        self.transitions = 0

    def update(self, load: EngineLoad) -> bool:
        was = self.overloaded
        self.overloaded = self._stays(load) if was else self._enters(load)
        if was != self.overloaded:
            self.transitions += 1
        return self.overloaded

    def _enters(self, load: EngineLoad) -> bool:
        t = self.thresholds
        return load.kv_usage >= t.kv_enter or load.queued_prefill_tokens >= t.queue_enter * load.batch_token_budget

    def _stays(self, load: EngineLoad) -> bool:
        t = self.thresholds
        calm = load.kv_usage < t.kv_leave and load.queued_prefill_tokens < t.queue_leave * load.batch_token_budget
        return not calm


class OIT:
    name = NAME

    def __init__(self, limits: Mapping[str, AppLimits] | None = None, config: OITConfig | None = None) -> None:
        self.config = config or OITConfig()
        self.detector = OverloadDetector(self.config.overload)
        self._limits: dict[str, AppLimits] = dict(limits or {})
        window = self.config.window_s
        self._rate_ua: defaultdict[tuple[str, str], SlidingWindow] = defaultdict(lambda: SlidingWindow(window))
        self._rate_app: defaultdict[str, SlidingWindow] = defaultdict(lambda: SlidingWindow(window))
        self._active: dict[str, Interaction] = {}
        self._ended: dict[str, float] = {}  # interaction_id -> when it ended
        self._stats: defaultdict[str, AppStats] = defaultdict(AppStats)
        self.throttled_interactions = 0
        self.throttled_by_user: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._last_sweep = float("-inf")

    # ---- load and limits ----------------------------------------------------------------------------
    @property
    def overloaded(self) -> bool:
        return self.detector.overloaded

    def observe_load(self, load: EngineLoad, now: float) -> bool:
        return self.detector.update(load)

    def set_limits(self, app: str, limits: AppLimits) -> None:
        self._limits[app] = limits

    def limits_for(self, app: str) -> AppLimits:
        return self._limits.get(app, self.config.default_limits)

    # ---- calls and interactions ---------------------------------------------------------------------
    def on_call(self, call: Call, now: float, load: EngineLoad | None = None) -> Admit | Reject:
        """Admit (the caller enqueues it) or reject with retry-after. Continuations are never rejected."""
        if load is not None:
            self.observe_load(load, now)
        self._sweep(now)
        stats = self._stats[call.app]
        stats.calls += 1
        live = self._live(call.interaction_id, now)
        if live is not None:
            live.last_seen, live.calls = now, live.calls + 1
            stats.continuation_calls += 1
            return Admit(reason="oit: continuation")
        if self._adoptable(call):
            self._start(call, now)
            stats.adopted_interactions += 1
            stats.continuation_calls += 1
            return Admit(reason="oit: continuation of an unknown interaction")
        wait, which = self._wait(call, now) if self.overloaded else (0.0, "")
        if wait > 0.0:
            return self._throttle(call, wait, which)
        self._start(call, now)
        stats.new_interactions += 1
        return Admit(reason="oit: new interaction")

    def touch(self, interaction_id: str, now: float) -> None:
        """A call of this interaction made progress or finished: it is not idle."""
        live = self._live(interaction_id, now)
        if live is not None:
            live.last_seen = max(live.last_seen, now)

    def end_interaction(self, interaction_id: str, now: float) -> bool:
        if self._active.pop(interaction_id, None) is None:
            return False
        self._ended[interaction_id] = now
        return True

    def active_interactions(self, now: float) -> int:
        self._sweep(now, force=True)
        return len(self._active)

    def export(self, now: float) -> OITState:
        """Everything a shared store needs to rebuild this OIT's view (after it lost its own copy)."""
        self._sweep(now, force=True)
        return OITState(
            active={iid: (i.user, i.app, i.last_seen) for iid, i in self._active.items()},
            ended=list(self._ended),
            user_app={k: w.times(now) for k, w in self._rate_ua.items()},
            app={k: w.times(now) for k, w in self._rate_app.items()},
        )

    def stats(self) -> dict[str, AppStats]:
        return {app: replace(s) for app, s in self._stats.items()}

    # ---- internals ----------------------------------------------------------------------------------
    def _live(self, interaction_id: str, now: float) -> Interaction | None:
        live = self._active.get(interaction_id)
        if live is not None and now - live.last_seen >= self.config.idle_s:
            del self._active[interaction_id]
            self._ended[interaction_id] = live.last_seen + self.config.idle_s
            return None
        return live

    def _adoptable(self, call: Call) -> bool:
        if call.call_index <= 0 or call.interaction_id in self._ended:
            return False
        cap = self.limits_for(call.app).max_calls_per_interaction or self.config.max_calls_per_interaction
        return call.call_index < cap

    def _start(self, call: Call, now: float) -> None:
        self._ended.pop(call.interaction_id, None)
        self._active[call.interaction_id] = Interaction(call.user, call.app, now, now)
        self._rate_ua[call.user, call.app].record(now)
        self._rate_app[call.app].record(now)

    def _wait(self, call: Call, now: float) -> tuple[float, str]:
        limits = self.limits_for(call.app)
        per_window = self.config.window_s / 60.0
        user_wait = _until_room(self._rate_ua[call.user, call.app], limits.user_per_min, per_window, now)
        app_wait = _until_room(self._rate_app[call.app], limits.app_per_min, per_window, now)
        if user_wait >= app_wait:
            return user_wait, f"user {call.user} over {limits.user_per_min} interactions/min of app {call.app}"
        return app_wait, f"app {call.app} over {limits.app_per_min} interactions/min"

    def _throttle(self, call: Call, wait: float, which: str) -> Reject:
        self.throttled_interactions += 1
        self.throttled_by_user[call.user, call.app] += 1
        self._stats[call.app].throttled_interactions += 1
        return Reject(retry_after_s=max(wait, self.config.min_retry_after_s), reason=f"oit: overloaded, {which}")

    def _sweep(self, now: float, force: bool = False) -> None:
        """Every idle_s: end idle interactions, forget old ended ids, drop empty rate windows."""
        if not force and now - self._last_sweep < self.config.idle_s:
            return
        self._last_sweep = now
        for iid in list(self._active):
            self._live(iid, now)
        horizon = self.config.forget_ended_s
        self._ended = {iid: t for iid, t in self._ended.items() if now - t < horizon}
        self._rate_ua = _drop_empty(self._rate_ua, now)
        self._rate_app = _drop_empty(self._rate_app, now)


def _drop_empty(rates: defaultdict[K, SlidingWindow], now: float) -> defaultdict[K, SlidingWindow]:
    for key in [k for k, w in rates.items() if w.count(now) == 0]:
        del rates[key]
    return rates


def _until_room(window: SlidingWindow, per_min: float | None, per_window: float, now: float) -> float:
    return 0.0 if per_min is None else window.time_until_below(per_min * per_window, now)


# ---- limits from history ----------------------------------------------------------------------------
def fit_limits(
    history: Iterable[tuple[str, str, float]],
    percentile: float = 99.0,
    slack: float = 1.2,
    window_s: float = 60.0,
) -> dict[str, AppLimits]:
    """Per-app limits from (user, app, interaction_start_time) records.

    A sample is the number of starts in the window (t − window_s, t] seen at each start t, i.e. the
    count the enforcer compares with its limit. L_user[app] = percentile over all (user, app) samples of
    that app × slack; L_app[app] = percentile of the app's samples × slack; both per minute.
    """
    per_ua: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
    per_app: defaultdict[str, list[float]] = defaultdict(list)
    for user, app, start in history:
        per_ua[user, app].append(start)
        per_app[app].append(start)
    user_samples: defaultdict[str, list[int]] = defaultdict(list)
    for (_, app), starts in per_ua.items():
        user_samples[app].extend(window_counts(starts, window_s))
    per_min = 60.0 / window_s
    return {
        app: AppLimits(
            user_per_min=percentile_of(user_samples[app], percentile) * slack * per_min,
            app_per_min=percentile_of(window_counts(starts, window_s), percentile) * slack * per_min,
        )
        for app, starts in per_app.items()
    }


def window_counts(starts: Iterable[float], window_s: float = 60.0) -> list[int]:
    """For each start t (sorted), the number of starts in (t − window_s, t]."""
    times = sorted(starts)
    counts: list[int] = []
    lo = 0
    for i, t in enumerate(times):
        while times[lo] + window_s <= t:
            lo += 1
        counts.append(i - lo + 1)
    return counts


def percentile_of(values: Iterable[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)
