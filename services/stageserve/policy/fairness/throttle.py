"""The throttler's state machine: admission (none / rpm / oit) + scheduling (none / fcfs / vtc / wsc) + capacity.

What: `admit(call, now)` asks the admission policy (RPM rejects per call whatever the load; OIT rejects only
new interactions under overload), then enqueues the call in the scheduler and dispatches while capacity
remains; the answer is Admit (started now), Queue (position) or Reject (retry-after). `report_tokens` charges
output as decode progresses; `release` charges the rest, frees capacity and dispatches queued calls in the
scheduler's order (VTC / WSC order under contention). `observe_load` feeds overload detection from the
engines' load reports plus the prompt tokens waiting in this throttler's own queue.
Capacity: at most `max_running_calls` calls and `max_running_tokens` reserved tokens (prompt + max output)
in the engines at once (0 = unlimited). It is what the throttler gates; overload only affects OIT.
Policies: always-admit (no queue), fcfs, rpm (RPM admission + FCFS order), vtc, fairserve (OIT + WSC).
The service and the simulator (`tools/eval_fairness.py`) both run this class; time is always an argument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from stageserve.policy.fairness.fcfs import FCFS
from stageserve.policy.fairness.oit import OIT, AppLimits, OITConfig, OverloadDetector, OverloadThresholds
from stageserve.policy.fairness.rpm import RPMConfig, RPMLimiter
from stageserve.policy.fairness.types import Admit, Call, Decision, EngineLoad, Queue, Reject, Scheduler
from stageserve.policy.fairness.vtc import VTC, VTCConfig
from stageserve.policy.fairness.wsc import WSC, WSCConfig

POLICIES = ("always-admit", "fcfs", "rpm", "vtc", "fairserve", "wsc")  # wsc: WSC order without OIT (ablation)


class Admission(Protocol):
    """Admission check before scheduling: OIT, RPM or a shared-state equivalent (Redis)."""

    def check(self, call: Call, now: float, overloaded: bool) -> Admit | Reject: ...

    def touch(self, call: Call, now: float) -> None: ...


class OITAdmission:
    """Adapts the pure OIT to `Admission`; the throttler's detector decides overload."""

    def __init__(self, oit: OIT) -> None:
        self.oit = oit

    def check(self, call: Call, now: float, overloaded: bool) -> Admit | Reject:
        self.oit.detector.overloaded = overloaded
        return self.oit.on_call(call, now)

    def touch(self, call: Call, now: float) -> None:
        self.oit.touch(call.interaction_id, now)


class RPMAdmission:
    def __init__(self, rpm: RPMLimiter) -> None:
        self.rpm = rpm

    def check(self, call: Call, now: float, overloaded: bool) -> Admit | Reject:
        return self.rpm.check(call, now)

    def touch(self, call: Call, now: float) -> None:
        pass


@dataclass(frozen=True)
class ThrottleConfig:
    policy: str = "fairserve"
    max_running_calls: int = 64
    max_running_tokens: int = 0  # 0 = unlimited
    batch_token_budget: int = 2048  # prefill tokens per step, summed over prefill replicas
    overload: OverloadThresholds = OverloadThresholds()
    limits: Mapping[str, AppLimits] = field(default_factory=dict)
    default_limits: AppLimits = AppLimits()
    rpm: RPMConfig = RPMConfig()
    wsc: WSCConfig = WSCConfig()
    weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy: unknown policy {self.policy!r} (known: {', '.join(POLICIES)})")


@dataclass
class Running:
    call: Call
    reserved: int
    output: int = 0
    last: float = 0.0  # start or last token report


def make_admission(config: ThrottleConfig) -> Admission | None:
    if config.policy == "rpm":
        return RPMAdmission(RPMLimiter(config.rpm))
    if config.policy == "fairserve":
        oit_config = OITConfig(overload=config.overload, default_limits=config.default_limits)
        return OITAdmission(OIT(config.limits, oit_config))
    return None


def make_scheduler(config: ThrottleConfig) -> Scheduler | None:
    w = config.wsc
    if config.policy in ("fcfs", "rpm"):
        return FCFS(w.w_in, w.w_out)
    if config.policy == "vtc":
        return VTC(VTCConfig(w.w_in, w.w_out, w.default_weight), config.weights)
    if config.policy in ("fairserve", "wsc"):
        return WSC(w, config.weights)
    return None


class Throttle:
    def __init__(
        self,
        config: ThrottleConfig | None = None,
        admission: Admission | None = None,
        on_decision: Callable[[Call, Decision], None] | None = None,
    ) -> None:
        self.config = config or ThrottleConfig()
        self.admission = admission if admission is not None else make_admission(self.config)
        self.scheduler = make_scheduler(self.config)
        self.detector = OverloadDetector(self.config.overload)
        self.on_decision = on_decision
        self.running: dict[str, Running] = {}
        self.queued: dict[str, Call] = {}
        self.started: list[Call] = []  # calls dispatched from the queue, not yet collected by the caller
        self.engine_load = EngineLoad(0.0, 0, self.config.batch_token_budget)
        self.decisions = {"admitted": 0, "queued": 0, "rejected": 0}
        self._reserved = 0

    @property
    def name(self) -> str:
        return self.config.policy

    @property
    def overloaded(self) -> bool:
        return self.detector.overloaded

    # ---- calls -------------------------------------------------------------------------------------
    def admit(self, call: Call, now: float) -> Decision:
        """Admit now, queue (position, 1-based) or reject. Duplicate request ids are a ValueError."""
        if call.request_id in self.running or call.request_id in self.queued:
            raise ValueError(f"request_id: {call.request_id!r} is already active")
        decision = self._decide(call, now)
        key = "admitted" if isinstance(decision, Admit) else "queued" if isinstance(decision, Queue) else "rejected"
        self.decisions[key] += 1
        if self.on_decision is not None:
            self.on_decision(call, decision)
        return decision

    def _decide(self, call: Call, now: float) -> Decision:
        if self.admission is not None:
            verdict = self.admission.check(call, now, self.overloaded)
            if isinstance(verdict, Reject):
                return verdict
        if self.scheduler is None:
            self._start(call, now)
            return Admit(reason=self.name)
        self.scheduler.enqueue(call, now)
        self.queued[call.request_id] = call
        self._refresh_overload()
        self.dispatch(now)
        if call.request_id in self.running:
            self.started = [c for c in self.started if c.request_id != call.request_id]
            return Admit(reason=self.name)
        return Queue(position=len(self.queued), reason=f"{self.name}: waiting for capacity")

    def dispatch(self, now: float) -> list[Call]:
        """Starts queued calls in the scheduler's order while they fit; returns them (also kept in `started`)."""
        if self.scheduler is None:
            return []
        out: list[Call] = []
        while (call := self.scheduler.pop_next(now, self.fits)) is not None:
            del self.queued[call.request_id]
            self._start(call, now)
            out.append(call)
        if out:
            self._refresh_overload()
        self.started.extend(out)
        return out

    def take_started(self) -> list[Call]:
        out, self.started = self.started, []
        return out

    def fits(self, call: Call) -> bool:
        c = self.config
        if c.max_running_calls and len(self.running) >= c.max_running_calls:
            return False
        return not c.max_running_tokens or self._reserved + _reserve(call) <= c.max_running_tokens or not self.running

    def report_tokens(self, request_id: str, output_total: int, now: float) -> None:
        """Cumulative output tokens of a running call: the increase is charged now."""
        run = self.running.get(request_id)
        if run is None or output_total <= run.output:
            return
        if self.scheduler is not None:
            self.scheduler.on_output_tokens(request_id, output_total - run.output, now)
        run.output = output_total
        run.last = max(run.last, now)
        if self.admission is not None:
            self.admission.touch(run.call, now)

    def release(self, request_id: str, output_total: int, now: float) -> list[Call]:
        """The call ended (or its client left while queued): charge, free capacity, dispatch the queue."""
        if request_id in self.queued:
            del self.queued[request_id]
            if self.scheduler is not None:
                self.scheduler.cancel(request_id, now)
            self._refresh_overload()
            return []
        if request_id not in self.running:
            return []
        self.report_tokens(request_id, output_total, now)
        run = self.running.pop(request_id)
        self._reserved -= run.reserved
        if self.scheduler is not None:
            self.scheduler.on_finish(request_id, now)
        if self.admission is not None:
            self.admission.touch(run.call, now)
        return self.dispatch(now)

    def expire(self, now: float, idle_s: float) -> list[Call]:
        """Releases running calls silent for `idle_s` (their Release was lost, e.g. a gateway died) and
        dispatches the queue into the freed capacity."""
        stale = [rid for rid, run in self.running.items() if now - run.last >= idle_s]
        started: list[Call] = []
        for rid in stale:
            started += self.release(rid, self.running[rid].output, now)
        return started

    # ---- load and metrics --------------------------------------------------------------------------
    def observe_load(self, load: EngineLoad, now: float) -> bool:
        """New engine load; also keeps the interactions of queued calls alive (a long wait is not idleness)."""
        self.engine_load = load
        if self.admission is not None:
            for call in self.queued.values():
                self.admission.touch(call, now)
        return self._refresh_overload()

    def queued_prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.queued.values())

    def _refresh_overload(self) -> bool:
        e = self.engine_load
        load = EngineLoad(e.kv_usage, e.queued_prefill_tokens + self.queued_prompt_tokens(), e.batch_token_budget)
        return self.detector.update(load)

    def service_gap(self) -> float:
        """Max difference of the scheduler's counters among backlogged users (0 with fewer than two)."""
        if self.scheduler is None:
            return 0.0
        counters = self.scheduler.counters()
        values = [counters.get(u, 0.0) for u in self.scheduler.backlogged_users()]
        return max(values) - min(values) if len(values) > 1 else 0.0

    def _start(self, call: Call, now: float = 0.0) -> None:
        run = Running(call, _reserve(call), last=now)
        self.running[call.request_id] = run
        self._reserved += run.reserved


def _reserve(call: Call) -> int:
    return call.prompt_tokens + call.max_output_tokens
