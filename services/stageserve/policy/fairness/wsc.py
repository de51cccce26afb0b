"""Weighted Service Counter scheduling (FairServe's scheduler; reconstructed, see papers.md §3.3).

What: VTC with two changes. (1) Charges are weighted by token type and normalised by the expected cost
N[app, stage] = w_in·E[in] + w_sys·E[sys] + w_out·E[out] of that (app, call index): admission adds
(w_in·in + w_sys·sys)/(N·weight), each reported output token adds w_out/(N·weight), N frozen when the call
is admitted. A user sending an app's typical call is therefore charged about 1 whatever the app's prompt
sizes. N is an EWMA learned online from finished calls; cold start falls back to the app's EWMA over all
its stages, then the global EWMA, then `default_cost`. (2) Among backlogged users whose counter is within
δ of the minimum, one whose head call continues an interaction (call_index > 0, or its interaction had a
call admitted less than `interaction_idle_s` ago) is served first, so running interactions finish sooner.
The VTC lift applies unchanged.
Unit of fairness: the user, in normalised service ("typical calls of their app").
Inputs: `Call.user/app/call_index/interaction_id/input_tokens/system_tokens`, reported output tokens.
Configuration: `WSCConfig` (weights 1/1/2, δ = 1 typical call, EWMA alpha 0.02, default cost, stage cap,
idle time); per-user weights; an optional pre-trained `CostModel`. δ = None means "the largest admit charge
seen so far" (papers.md's default); the evaluation (docs/benchmarks.md) showed that in normalised units that
maximum is set by outliers (a 4k-token prompt of an app whose typical call costs a few hundred tokens) and
lets continuations overtake fairness; a faster EWMA (0.1) makes N noisy and the charges with it.
Trade-offs: fair across apps of different shapes and kinder to interactions; the bound becomes
2·max(max admit charge, w_out·M/N_min) + δ in normalised units, and a user can game N by making an
app's calls atypically large (N adapts, by EWMA, to what that app's users send). O(users) per admission.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stageserve.policy.fairness.types import Call
from stageserve.policy.fairness.vtc import VTC, RunningCall, VTCConfig

NAME = "wsc"


@dataclass(frozen=True)
class WSCConfig:
    w_in: float = 1.0
    w_sys: float = 1.0
    w_out: float = 2.0
    default_weight: float = 1.0
    delta: float | None = 1.0  # one typical call (normalised units); None = the largest admit charge seen
    ewma_alpha: float = 0.02
    default_cost: float = 1024.0
    min_cost: float = 1.0
    max_stage: int = 15  # call indices above share this stage's estimate
    interaction_idle_s: float = 120.0


class CostModel:
    """Expected weighted cost per (app, stage), per app and globally, as EWMAs of finished calls."""

    def __init__(self, config: WSCConfig | None = None) -> None:
        self.config = config or WSCConfig()
        self._stage: dict[tuple[str, int], float] = {}
        self._app: dict[str, float] = {}
        self._global: float | None = None

    def observe(self, app: str, stage: int, input_tokens: int, system_tokens: int, output_tokens: int) -> None:
        c = self.config
        cost = c.w_in * input_tokens + c.w_sys * system_tokens + c.w_out * output_tokens
        key = (app, self._clamp(stage))
        self._stage[key] = self._ewma(self._stage.get(key), cost)
        self._app[app] = self._ewma(self._app.get(app), cost)
        self._global = self._ewma(self._global, cost)

    def cost(self, app: str, stage: int) -> float:
        return max(self.config.min_cost, self.lookup(app, stage)[0])

    def lookup(self, app: str, stage: int) -> tuple[float, str]:
        """(estimate, source) where source is 'stage', 'app', 'global' or 'default'."""
        stage_cost = self._stage.get((app, self._clamp(stage)))
        if stage_cost is not None:
            return stage_cost, "stage"
        if app in self._app:
            return self._app[app], "app"
        if self._global is not None:
            return self._global, "global"
        return self.config.default_cost, "default"

    def _clamp(self, stage: int) -> int:
        return min(max(stage, 0), self.config.max_stage)

    def _ewma(self, old: float | None, x: float) -> float:
        return x if old is None else old + self.config.ewma_alpha * (x - old)


class WSC(VTC):
    name = NAME

    def __init__(
        self,
        config: WSCConfig | None = None,
        weights: Mapping[str, float] | None = None,
        cost_model: CostModel | None = None,
    ) -> None:
        self.wsc_config = config or WSCConfig()
        super().__init__(
            VTCConfig(self.wsc_config.w_in, self.wsc_config.w_out, self.wsc_config.default_weight), weights
        )
        self.cost_model = cost_model or CostModel(self.wsc_config)
        self._active: dict[str, float] = {}  # interaction_id -> last activity
        self._last_prune = float("-inf")
        self.max_admit_charge = 0.0
        self.continuation_picks = 0

    @property
    def delta(self) -> float:
        return self.max_admit_charge if self.wsc_config.delta is None else self.wsc_config.delta

    def admission_charge(self, call: Call) -> float:
        raw = self.wsc_config.w_in * call.input_tokens + self.wsc_config.w_sys * call.system_tokens
        return raw / self._scale(call)

    def output_charge(self, call: Call) -> float:
        return self.wsc_config.w_out / self._scale(call)

    def is_continuation(self, call: Call, now: float) -> bool:
        if call.call_index > 0:
            return True
        seen = self._active.get(call.interaction_id)
        return seen is not None and now - seen < self.wsc_config.interaction_idle_s

    def _scale(self, call: Call) -> float:
        return self.cost_model.cost(call.app, call.call_index) * self.weight(call.user)

    def _pick_user(self, now: float) -> str:
        least = super()._pick_user(now)
        bar = self._counters[least] + self.delta
        near = [u for u in self._backlog if self._counters[u] <= bar and self._head_continues(u, now)]
        if not near:
            return least
        chosen = min(near, key=self._rank)
        if chosen != least:
            self.continuation_picks += 1
        return chosen

    def _head_continues(self, user: str, now: float) -> bool:
        return self.is_continuation(self._backlog[user][0][1], now)

    def _admit(self, call: Call, now: float) -> None:
        self.max_admit_charge = max(self.max_admit_charge, self.admission_charge(call))
        super()._admit(call, now)

    def _finished(self, running: RunningCall, now: float) -> None:
        c = running.call
        self.cost_model.observe(c.app, c.call_index, c.input_tokens, c.system_tokens, running.output_tokens)
        self._touch(c, now)

    def _touch(self, call: Call, now: float) -> None:
        self._active[call.interaction_id] = now
        if now - self._last_prune >= self.wsc_config.interaction_idle_s:
            self._prune(now)

    def _prune(self, now: float) -> None:
        idle = self.wsc_config.interaction_idle_s
        self._active = {iid: t for iid, t in self._active.items() if now - t < idle}
        self._last_prune = now
