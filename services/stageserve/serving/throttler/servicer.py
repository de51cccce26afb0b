"""Throttler shell: Admit / AwaitAdmission / ReportTokens / Release / ReportLoad over the `Throttle` state machine.

Admit calls that arrive together are decided in one batch (one Redis round trip with the redis state).
Queued calls wait in AwaitAdmission until `Release` frees capacity and the scheduler picks them.
Load reports come from the gateway, which forwards the prefill/decode loads it polls every
`gateway.load_poll_interval_s` (engines may also report directly); reports older than `load_ttl_s` are ignored.

Hooks for metrics: `overloaded` (bool), `service_gap_tokens()` (max counter gap among backlogged users),
`redis_degraded` (bool), `decision_listeners` (callables `(decision, app, interaction_id)` with decision in
admitted | queued | rejected), `throttle.decisions` (totals).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from stageserve.policy.fairness.oit import AppLimits, OverloadThresholds
from stageserve.policy.fairness.rpm import RPMConfig
from stageserve.policy.fairness.throttle import Throttle, ThrottleConfig, make_admission
from stageserve.policy.fairness.types import Admit, Call, Decision, EngineLoad, Queue
from stageserve.policy.fairness.wsc import WSCConfig
from stageserve.serving.common.config import ConfigError, StageServeConfig
from stageserve.serving.common.errors import BadRequest, abort
from stageserve.serving.throttler.state_redis import RedisAdmission, RedisState, wall_clock
from stageserve.v1 import common_pb2, throttler_pb2, throttler_pb2_grpc

log = logging.getLogger("stageserve.throttler")
R = throttler_pb2.AdmitResponse


def throttle_config(config: StageServeConfig) -> ThrottleConfig:
    t = config.throttler
    budget = t.batch_token_budget or config.prefill.max_num_batched_tokens * config.prefill.replicas
    return ThrottleConfig(
        policy=t.policy,
        max_running_calls=t.max_running_calls,
        max_running_tokens=t.max_running_tokens,
        batch_token_budget=budget,
        overload=OverloadThresholds(t.kv_enter, t.kv_leave, t.queue_enter, t.queue_leave),
        limits={app: _app_limits(app, v) for app, v in t.limits.items()},
        default_limits=AppLimits(t.default_user_per_min or None, t.default_app_per_min or None),
        rpm=RPMConfig(t.rpm_user or None, t.rpm_app or None),
        wsc=WSCConfig(w_in=t.w_in, w_sys=t.w_sys, w_out=t.w_out),
        weights={str(u): float(w) for u, w in t.weights.items()},
    )


def _app_limits(app: str, raw: object) -> AppLimits:
    if not isinstance(raw, dict) or set(raw) - {"user_per_min", "app_per_min", "max_calls_per_interaction"}:
        raise ConfigError(
            f"throttler.limits.{app}: expected a mapping of user_per_min, app_per_min, max_calls_per_interaction"
        )
    cap = raw.get("max_calls_per_interaction")
    return AppLimits(raw.get("user_per_min"), raw.get("app_per_min"), int(cap) if cap is not None else None)


@dataclass
class LoadReport:
    stage: str
    kv_usage: float
    pending_tokens: int
    at: float


class ThrottlerServicer(throttler_pb2_grpc.ThrottlerServicer):
    def __init__(self, config: StageServeConfig, replica: int = 0, clock: Callable[[], float] = wall_clock) -> None:
        self.config = config
        self.replica_id = f"throttler-{replica}"
        self.clock = clock
        tcfg = throttle_config(config)
        self.shared: RedisAdmission | None = None
        admission = None
        if config.throttler.state == "redis":
            state = RedisState(config.throttler.redis_url, config.throttler.redis_prefix)
            self.shared = RedisAdmission(state, make_admission(tcfg), tcfg.limits, tcfg.default_limits)  # type: ignore[arg-type]
            admission = self.shared
        self.throttle = Throttle(tcfg, admission, on_decision=self._decided)
        self.decision_listeners: list[Callable[[str, str, str], None]] = []
        self.loads: dict[str, LoadReport] = {}
        self._waiters: dict[str, asyncio.Future[R]] = {}
        self._batch: list[tuple[Call, asyncio.Future[Decision]]] = []
        self._snapshot: dict[str, float] = {}
        self._sync_task: asyncio.Task[None] | None = None

    # ---- metric hooks -----------------------------------------------------------------------------
    @property
    def policy(self) -> str:
        return self.throttle.name

    @property
    def overloaded(self) -> bool:
        return self.throttle.overloaded or bool(self.shared and self.shared.shared_overloaded)

    @property
    def redis_degraded(self) -> bool:
        return bool(self.shared and self.shared.degraded)

    def service_gap_tokens(self) -> float:
        return self.throttle.service_gap()

    def _decided(self, call: Call, decision: Decision) -> None:
        name = "admitted" if isinstance(decision, Admit) else "queued" if isinstance(decision, Queue) else "rejected"
        for listener in self.decision_listeners:
            listener(name, call.app, call.interaction_id)

    # ---- rpcs -------------------------------------------------------------------------------------
    async def Admit(self, request: throttler_pb2.AdmitRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        try:
            call = self._call(request)
        except BadRequest as exc:
            await abort(context, exc)
        decision = await self._decide(call)
        if isinstance(decision, BadRequest):
            await abort(context, decision)
        return self._response(call.request_id, decision)

    async def AwaitAdmission(self, request: throttler_pb2.AwaitRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        rid = request.request_id
        if rid in self.throttle.running:
            return R(decision=R.ADMITTED, policy=self.policy)
        if rid not in self.throttle.queued:
            await abort(context, BadRequest(f"request_id: {rid!r} is neither queued nor running", field="request_id"))
        waiter = self._waiters.setdefault(rid, asyncio.get_running_loop().create_future())
        remaining = context.time_remaining()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout=remaining)
        except TimeoutError:
            self._release(rid, 0)
            return R(decision=R.REJECTED, reason="deadline passed while queued", policy=self.policy)
        except asyncio.CancelledError:  # the client went away: drop its queued call
            self._release(rid, 0)
            raise

    async def ReportTokens(self, request: throttler_pb2.TokenReport, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        self.throttle.report_tokens(request.request_id, request.counts.output, self.clock())
        return throttler_pb2.ReportAck()

    async def Release(self, request: throttler_pb2.ReleaseRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        self._release(request.request_id, request.counts.output)
        return throttler_pb2.ReportAck()

    async def ReportLoad(self, request: common_pb2.StageLoad, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        if not 0.0 <= request.kv_cache_usage <= 1.0:
            await abort(context, BadRequest("kv_cache_usage: must be in [0, 1]", field="kv_cache_usage"))
        self.report_load(request)
        return throttler_pb2.ReportAck()

    # ---- internals --------------------------------------------------------------------------------
    def _call(self, request: throttler_pb2.AdmitRequest) -> Call:
        if not request.request_id:
            raise BadRequest("request_id: required", field="request_id")
        t, e = request.tenant, request.expected
        for name, value in (("request_id", request.request_id), ("tenant.user", t.user), ("tenant.app", t.app),
                            ("tenant.interaction_id", t.interaction_id)):
            if len(value) > 256 or any(ch in value for ch in "\x1e\x1f"):
                raise BadRequest(f"{name}: at most 256 characters, no ASCII separators", field=name)
        return Call(
            request_id=request.request_id,
            user=t.user or "anonymous",
            app=t.app or "default",
            interaction_id=t.interaction_id or request.request_id,
            call_index=t.call_index,
            input_tokens=e.input,
            system_tokens=e.system,
            max_output_tokens=e.output,
            arrival=self.clock(),
        )

    async def _decide(self, call: Call) -> Decision | BadRequest:
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._batch.append((call, future))
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        """Decides every Admit that arrived since the last flush (one Redis round trip with shared state)."""
        batch, self._batch = self._batch, []
        now = self.clock()
        self._sync([c for c, _ in batch], now)
        for call, future in batch:
            try:
                decision: Decision | BadRequest = self.throttle.admit(call, now)
            except ValueError as exc:
                decision = BadRequest(str(exc), field="request_id")
            if not future.done():
                future.set_result(decision)  # type: ignore[arg-type]
        self._wake(self.throttle.take_started())

    def _sync(self, calls: list[Call], now: float) -> None:
        """Shared state: push counter deltas, decide `calls` in Redis, pull shared counters of the backlog."""
        if self.shared is None:
            return
        sched = self.throttle.scheduler
        if self.shared.lost_state:  # Redis came back empty: push full counters, not deltas
            self.shared.lost_state = False
            self.shared.pending.deltas.clear()
            self._snapshot = {}
        if sched is not None:
            current = sched.counters()
            self.shared.add_deltas({u: v - self._snapshot.get(u, 0.0) for u, v in current.items()})
            read = [*sched.backlogged_users(), *(c.user for c in calls)]
        else:
            read = []
        shared = self.shared.prefetch(calls, now, self.throttle.overloaded, read)
        if sched is not None:
            if shared:
                sched.sync_counters(shared)
            self._snapshot = dict(sched.counters())

    def _response(self, rid: str, decision: Decision) -> R:
        if isinstance(decision, Admit):
            return R(decision=R.ADMITTED, reason=decision.reason, policy=self.policy)
        if isinstance(decision, Queue):
            return R(decision=R.QUEUED, queue_position=decision.position, reason=decision.reason, policy=self.policy)
        return R(decision=R.REJECTED, retry_after_s=decision.retry_after_s, reason=decision.reason, policy=self.policy)

    def _release(self, rid: str, output: int) -> None:
        started = self.throttle.release(rid, output, self.clock())
        waiter = self._waiters.pop(rid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(R(decision=R.REJECTED, reason="released while queued", policy=self.policy))
        self._wake(started)
        self.throttle.take_started()

    def _wake(self, started: list[Call]) -> None:
        for call in started:  # an AwaitAdmission arriving later finds the call running
            waiter = self._waiters.pop(call.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(R(decision=R.ADMITTED, reason="dispatched from the queue", policy=self.policy))

    def report_load(self, load: common_pb2.StageLoad) -> bool:
        """Records one replica's load, recomputes overload (shared through Redis with that state)."""
        now = self.clock()
        ttl = self.config.throttler.load_ttl_s
        key = f"{load.stage}/{load.replica_id or load.address}"
        self.loads[key] = LoadReport(load.stage, load.kv_cache_usage, load.pending_tokens, now)
        reports = self.loads
        if self.shared is not None and not self.shared.degraded:
            reports = self._shared_loads(key, now, ttl) or reports
        fresh = [r for r in reports.values() if now - r.at < ttl]
        kv = [r.kv_usage for r in fresh if r.stage in ("prefill", "decode")]
        pending = sum(r.pending_tokens for r in fresh if r.stage == "prefill")
        engine = EngineLoad(sum(kv) / len(kv) if kv else 0.0, pending, self.throttle.config.batch_token_budget)
        overloaded = self.throttle.observe_load(engine, now)
        if self.shared is not None and not self.shared.degraded:
            try:
                self.shared.state.set_overloaded(overloaded, ttl)
            except Exception as exc:  # redis down: the next decision notices and falls back
                log.warning("redis: cannot share overload flag: %s", exc)
        return overloaded

    def _shared_loads(self, key: str, now: float, ttl: float) -> dict[str, LoadReport] | None:
        assert self.shared is not None
        mine = self.loads[key]
        try:
            raw = self.shared.state.share_load(key, f"{mine.stage}|{mine.kv_usage!r}|{mine.pending_tokens}", now, ttl)
        except Exception as exc:
            log.warning("redis: cannot share load report: %s", exc)
            return None
        out: dict[str, LoadReport] = {}
        for k, v in raw.items():
            at, stage, kv, pending = v.split("|")
            out[k] = LoadReport(stage, float(kv), int(pending), float(at))
        return out

    async def _periodic(self, interval_s: float = 0.2) -> None:
        """Pushes counter deltas and touches even when no Admit arrives (shared state), and releases running
        calls whose Release never came (`throttler.running_idle_s`), so lost calls cannot hold capacity."""
        while True:
            await asyncio.sleep(interval_s)
            now = self.clock()
            if self.shared is not None:
                self._sync([], now)
            self._wake(self.throttle.expire(now, self.config.throttler.running_idle_s))
            self.throttle.take_started()

    def start_background(self) -> None:
        if self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._periodic())
