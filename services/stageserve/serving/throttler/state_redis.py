"""Redis-backed shared throttler state: several throttler replicas decide as one.

What is shared (all under one key prefix, every key with a TTL):
- OIT: active interactions (`ia:<iid>` = last seen, so expiry follows the caller's clock), interactions
  seen (`seen:<iid>`, to tell an ended interaction from an unknown one), interaction starts per (user, app)
  and per app in sorted sets (`rua:<user>|<app>`, `ra:<app>`) for the sliding windows;
- RPM: call windows per user and per app (`cu:<user>`, `ca:<app>`);
- VTC/WSC service counters per user (hash `svc`), pushed as deltas and read back before scheduling;
- engine loads per replica (hash `loads`) and the overload flag (`overloaded`), so every replica sees the
  same overload.
One Lua script (`DECIDE`) decides a whole batch of calls atomically in one round trip: it applies pending
counter deltas and interaction touches, reads counters, and checks every call against the windows with the
same semantics as the pure `OIT` / `RPMLimiter` (same window expiry and retry-after arithmetic).
If Redis is unreachable the admission falls back to a local pure policy (always fed, so its state is warm),
logs it and sets `degraded`; starts admitted meanwhile are kept and replayed into Redis when it returns,
and counter deltas accumulate until they can be pushed (resync).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import redis

from stageserve.policy.fairness.oit import AppLimits
from stageserve.policy.fairness.throttle import Admission, OITAdmission, RPMAdmission
from stageserve.policy.fairness.types import Admit, Call, Reject

log = logging.getLogger("stageserve.throttler")

DECIDE = r"""
local p = ARGV[1]
local now = tonumber(ARGV[2])
local ov = ARGV[3] == '1' or redis.call('GET', p .. ':overloaded') == '1'
local mode = ARGV[4]
local window = tonumber(ARGV[5])
local idle = tonumber(ARGV[6])
local forget_ms = tonumber(ARGV[7])
local gc_ms = math.ceil(math.max(window, idle) * 2000) + 1000
-- ARGV[8..11]: deltas, touches, users to read, calls; records end with \30, fields end with \31
local function records(blob)
  local out = {}
  for rec in string.gmatch(blob, '([^\30]*)\30') do
    local f = {}
    for x in string.gmatch(rec, '([^\31]*)\31') do f[#f + 1] = x end
    out[#out + 1] = f
  end
  return out
end
for _, f in ipairs(records(ARGV[8])) do redis.call('HINCRBYFLOAT', p .. ':svc', f[1], f[2]) end
for _, f in ipairs(records(ARGV[9])) do
  if redis.call('EXISTS', p .. ':ia:' .. f[1]) == 1 then redis.call('SET', p .. ':ia:' .. f[1], f[2], 'PX', gc_ms) end
end
local users = {}
for _, f in ipairs(records(ARGV[10])) do users[#users + 1] = f[1] end
local counters = {}
if #users > 0 then
  local vals = redis.call('HMGET', p .. ':svc', unpack(users))
  for k = 1, #users do counters[k] = vals[k] or '' end
end
local verdicts = {}
local function wait(key, limit)
  if limit < 0 then return 0 end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local n = redis.call('ZCARD', key)
  local excess = n - math.max(0, math.ceil(limit)) + 1
  if excess <= 0 then return 0 end
  if excess > n then return -1 end
  local e = redis.call('ZRANGE', key, excess - 1, excess - 1, 'WITHSCORES')
  return tonumber(e[2]) + window - now
end
local function worst(a, b)
  if a < 0 or b < 0 then return -1 end
  return math.max(a, b)
end
local function record(key, member)
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, gc_ms)
end
for _, f in ipairs(records(ARGV[11])) do
  local rid, user, app, iid = f[1], f[2], f[3], f[4]
  local ci, ulim, alim, cap = tonumber(f[5]), tonumber(f[6]), tonumber(f[7]), tonumber(f[8])
  local verdict = 'A'
  if mode == 'oit' then
    local ia = p .. ':ia:' .. iid
    local last = redis.call('GET', ia)
    local live = last and now - tonumber(last) < idle
    local seen = redis.call('EXISTS', p .. ':seen:' .. iid) == 1
    local ua = p .. ':rua:' .. user .. '|' .. app
    local ak = p .. ':ra:' .. app
    if live then
      redis.call('SET', ia, tostring(now), 'PX', gc_ms)
      verdict = 'A|c'
    else
      local adopt = ci > 0 and not seen and ci < cap
      local w = 0
      if not adopt and ov then
        local wu = wait(ua, ulim)
        local wa = wait(ak, alim)
        w = worst(wu, wa)
        if w ~= 0 then
          local which = 'u'
          if wu >= 0 and (wa < 0 or wa > wu) then which = 'a' end
          verdict = 'R|' .. tostring(w) .. '|' .. which
        end
      end
      if w == 0 then
        redis.call('SET', ia, tostring(now), 'PX', gc_ms)
        redis.call('SET', p .. ':seen:' .. iid, '1', 'PX', forget_ms)
        record(ua, iid .. '@' .. tostring(now))
        record(ak, iid .. '@' .. tostring(now))
        verdict = adopt and 'A|a' or 'A|n'
      end
    end
  elseif mode == 'rpm' then
    local uk = p .. ':cu:' .. user
    local ak = p .. ':ca:' .. app
    local wu = wait(uk, ulim)
    local wa = wait(ak, alim)
    local w = worst(wu, wa)
    if w ~= 0 then
      local which = 'u'
      if wu >= 0 and (wa < 0 or wa > wu) then which = 'a' end
      verdict = 'R|' .. tostring(w) .. '|' .. which
    else
      record(uk, rid)
      record(ak, rid)
    end
  end
  verdicts[#verdicts + 1] = verdict
end
return {ov and '1' or '0', table.concat(counters, '\30'), table.concat(verdicts, '\30')}
"""


@dataclass
class Pending:
    """What this replica owes Redis: counter deltas, interaction touches, starts made while Redis was down."""

    deltas: dict[str, float]
    touches: dict[str, float]
    starts: list[tuple[Call, float]]


class RedisState:
    """Connection, scripts and key layout. `url` like redis://127.0.0.1:6379/0."""

    def __init__(self, url: str, prefix: str = "stageserve:throttler", timeout_s: float = 0.25) -> None:
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self.decide = self.client.register_script(DECIDE)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def share_load(self, replica: str, fields: str, now: float, ttl_s: float) -> dict[str, str]:
        """Stores this replica's load report and returns every replica's report (caller filters by age)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key("loads"), replica, f"{now!r}|{fields}")
        pipe.pexpire(self.key("loads"), int(ttl_s * 4000) + 1000)
        pipe.hgetall(self.key("loads"))
        raw = pipe.execute()[-1]
        return {k.decode(): v.decode() for k, v in raw.items()}

    def set_overloaded(self, overloaded: bool, ttl_s: float) -> None:
        self.client.set(self.key("overloaded"), "1" if overloaded else "0", px=int(ttl_s * 1000))

    def replay(self, pending: Pending, idle_s: float, window_s: float, forget_s: float, mode: str) -> None:
        """Resync after an outage: push counter deltas, touches and the starts admitted from local state."""
        gc_ms = math.ceil(max(window_s, idle_s) * 2000) + 1000
        pipe = self.client.pipeline(transaction=True)
        for user, d in pending.deltas.items():
            pipe.hincrbyfloat(self.key("svc"), user, d)
        for call, now in pending.starts:
            if mode == "oit":
                if call.interaction_id in pending.touches:
                    now = max(now, pending.touches[call.interaction_id])
                pipe.set(self.key("ia", call.interaction_id), repr(now), px=gc_ms)
                pipe.set(self.key("seen", call.interaction_id), "1", px=int(forget_s * 1000))
                for k in (self.key("rua", f"{call.user}|{call.app}"), self.key("ra", call.app)):
                    pipe.zadd(k, {f"{call.interaction_id}@{now!r}": now})
                    pipe.pexpire(k, gc_ms)
            else:
                for k in (self.key("cu", call.user), self.key("ca", call.app)):
                    pipe.zadd(k, {call.request_id: now})
                    pipe.pexpire(k, gc_ms)
        pipe.execute()

    def epoch(self) -> str | None:
        """A token that changes when Redis lost its data (restarted without persistence, flushed)."""
        value = self.client.get(self.key("epoch"))
        return value.decode() if value else None

    def claim_epoch(self) -> str:
        self.client.set(self.key("epoch"), uuid.uuid4().hex, nx=True, ex=7 * 86400)
        return self.epoch() or ""

    def restore(self, local: OITAdmission | RPMAdmission | None, now: float, idle_s: float, window_s: float,
                forget_s: float) -> None:
        """Redis lost its data: rebuild the shared windows and interactions from this replica's local view."""
        gc_ms = math.ceil(max(window_s, idle_s) * 2000) + 1000
        pipe = self.client.pipeline(transaction=True)

        def window(key: str, times: list[float]) -> None:
            if times:
                pipe.zadd(key, {f"restore@{t!r}@{k}": t for k, t in enumerate(times)})
                pipe.pexpire(key, gc_ms)

        if isinstance(local, OITAdmission):
            state = local.oit.export(now)
            for iid, (_, _, last) in state.active.items():
                pipe.set(self.key("ia", iid), repr(last), px=gc_ms)
            for iid in [*state.active, *state.ended]:
                pipe.set(self.key("seen", iid), "1", px=int(forget_s * 1000))
            for (user, app), times in state.user_app.items():
                window(self.key("rua", f"{user}|{app}"), times)
            for app, times in state.app.items():
                window(self.key("ra", app), times)
        elif isinstance(local, RPMAdmission):
            users, apps = local.rpm.export(now)
            for user, times in users.items():
                window(self.key("cu", user), times)
            for app, times in apps.items():
                window(self.key("ca", app), times)
        pipe.execute()

    def flush_all(self) -> None:
        """Deletes this prefix's keys (tests and benchmarks)."""
        for k in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            self.client.delete(k)


class RedisAdmission(Admission):
    """OIT or RPM admission decided in Redis (shared), falling back to `local` when Redis is unreachable.

    `prefetch(calls, ...)` decides a batch in one round trip; `check` then returns the prefetched verdict
    (or decides one call on its own). Counter sync for the scheduler goes through `sync_counters`.
    """

    def __init__(
        self,
        state: RedisState,
        local: OITAdmission | RPMAdmission | None,
        limits: Mapping[str, AppLimits],
        default_limits: AppLimits,
        retry_s: float = 1.0,
    ) -> None:
        self.state = state
        self.local = local
        self.mode = "oit" if isinstance(local, OITAdmission) else "rpm" if isinstance(local, RPMAdmission) else "none"
        self.limits = dict(limits)
        self.default_limits = default_limits
        self.retry_s = retry_s
        self.degraded = False
        self.outages = 0
        self.pending = Pending({}, {}, [])
        self.shared_overloaded = False
        self._verdicts: dict[str, Admit | Reject] = {}
        self._next_try = 0.0
        self.lost_state = False  # set when Redis came back empty: the caller re-pushes its full counters
        try:
            self.epoch: str | None = state.claim_epoch()
        except redis.RedisError as exc:
            self.epoch = None
            self._down(exc, 0.0)
        if self.mode == "oit":
            assert isinstance(local, OITAdmission)
            cfg = local.oit.config
            self.window_s, self.idle_s, self.forget_s = cfg.window_s, cfg.idle_s, cfg.forget_ended_s
            self.cap_default, self.min_retry = cfg.max_calls_per_interaction, cfg.min_retry_after_s
        else:
            window = local.rpm.config.window_s if isinstance(local, RPMAdmission) else 60.0
            self.window_s, self.idle_s, self.forget_s = window, 0.0, 0.0
            self.cap_default, self.min_retry = 0, 0.0

    # ---- Admission --------------------------------------------------------------------------------
    def check(self, call: Call, now: float, overloaded: bool) -> Admit | Reject:
        verdict = self._verdicts.pop(call.request_id, None)
        if verdict is None:
            self.prefetch([call], now, overloaded, ())
            verdict = self._verdicts.pop(call.request_id)
        return verdict

    def touch(self, call: Call, now: float) -> None:
        if self.local is not None:
            self.local.touch(call, now)
        if self.mode == "oit":
            self.pending.touches[call.interaction_id] = now

    # ---- batches ----------------------------------------------------------------------------------
    def prefetch(
        self, calls: Sequence[Call], now: float, overloaded: bool, read_users: Iterable[str]
    ) -> dict[str, float] | None:
        """Decides `calls` in Redis (one round trip) and returns the shared counters of `read_users`.

        Returns None (and decides from local state) when Redis is unreachable.
        """
        users = list(dict.fromkeys(read_users))
        if not self._available(now):
            self._decide_locally(calls, now, overloaded)
            return None
        args = self._args(calls, now, overloaded, users)
        try:
            out = self.state.decide(args=args)
        except redis.RedisError as exc:
            self._down(exc, now)
            self._decide_locally(calls, now, overloaded)
            return None
        self.pending.deltas.clear()
        self.pending.touches.clear()
        self.shared_overloaded = out[0] == b"1"
        values = out[1].decode().split(RS) if users else []
        counters = {u: float(v) for u, v in zip(users, values, strict=True) if v}
        verdicts = out[2].decode().split(RS) if calls else []
        for call, raw in zip(calls, verdicts, strict=True):
            self._verdicts[call.request_id] = self._verdict(call, raw)
            if self.local is not None:
                self.local.check(call, now, overloaded)  # keep the fallback's state warm; its answer is not used
        return counters

    def add_deltas(self, deltas: Mapping[str, float]) -> None:
        for user, d in deltas.items():
            if d:
                self.pending.deltas[user] = self.pending.deltas.get(user, 0.0) + d

    # ---- internals --------------------------------------------------------------------------------
    def _args(self, calls: Sequence[Call], now: float, overloaded: bool, users: list[str]) -> list[str]:
        """One string per list (records end with RS, fields with US): redis-py packs few large args fast."""
        a: list[str] = [self.state.prefix, repr(now), "1" if overloaded else "0", self.mode]
        a += [repr(self.window_s), repr(self.idle_s), str(int(self.forget_s * 1000) or 1000)]
        a.append("".join(f"{u}{US}{d!r}{US}{RS}" for u, d in self.pending.deltas.items()))
        a.append("".join(f"{iid}{US}{t!r}{US}{RS}" for iid, t in self.pending.touches.items()))
        a.append("".join(f"{u}{US}{RS}" for u in users))
        parts = []
        for c in calls:
            ulim, alim, cap = self._limits(c.app)
            fields = (c.request_id, c.user, c.app, c.interaction_id, str(c.call_index), ulim, alim, str(cap))
            parts.append(US.join(fields) + US + RS)
        a.append("".join(parts))
        return a

    def _limits(self, app: str) -> tuple[str, str, int]:
        if self.mode == "rpm":
            assert isinstance(self.local, RPMAdmission)
            rc = self.local.rpm.config
            return _lim(rc.user_rpm, 1.0), _lim(rc.app_rpm, 1.0), 0
        lim = self.limits.get(app, self.default_limits)
        per_window = self.window_s / 60.0
        cap = lim.max_calls_per_interaction or self.cap_default
        return _lim(lim.user_per_min, per_window), _lim(lim.app_per_min, per_window), cap

    def _verdict(self, call: Call, raw: str) -> Admit | Reject:
        if raw.startswith("A"):
            return Admit(reason=_ADMIT_REASONS.get(raw, self.mode))
        _, wait_s, which = raw.split("|")
        wait = float(wait_s)
        wait = math.inf if wait < 0 else wait
        if self.mode == "oit":
            lim = self.limits.get(call.app, self.default_limits)
            what = (
                f"user {call.user} over {lim.user_per_min} interactions/min of app {call.app}"
                if which == "u"
                else f"app {call.app} over {lim.app_per_min} interactions/min"
            )
            return Reject(retry_after_s=max(wait, self.min_retry), reason=f"oit: overloaded, {what}")
        assert isinstance(self.local, RPMAdmission)
        rc = self.local.rpm.config
        what = f"user {call.user} over {rc.user_rpm}" if which == "u" else f"app {call.app} over {rc.app_rpm}"
        return Reject(retry_after_s=wait, reason=f"rpm: {what}/window")

    def _decide_locally(self, calls: Sequence[Call], now: float, overloaded: bool) -> None:
        for call in calls:
            verdict = Admit(reason="local") if self.local is None else self.local.check(call, now, overloaded)
            self._verdicts[call.request_id] = verdict
            if self.mode == "oit" and verdict.reason == "oit: continuation":
                self.pending.touches[call.interaction_id] = now
            elif isinstance(verdict, Admit) and self.mode != "none":
                self.pending.starts.append((call, now))

    def _available(self, now: float) -> bool:
        if not self.degraded:
            return True
        if now < self._next_try:
            return False
        try:
            lost = self.state.epoch() != self.epoch
            if lost:  # Redis restarted empty: rebuild from the local view, which saw everything this replica did
                self.state.restore(self.local, now, self.idle_s, self.window_s, self.forget_s)
                self.epoch = self.state.claim_epoch()
            else:
                self.state.replay(self.pending, self.idle_s, self.window_s, self.forget_s, self.mode)
        except redis.RedisError:
            self._next_try = now + self.retry_s
            return False
        self.lost_state = self.lost_state or lost
        log.warning("redis %s is back (%s): resynced %d starts, %d counter deltas", self.state.url,
                    "restored from local state" if lost else "replayed the outage",
                    len(self.pending.starts), len(self.pending.deltas))
        self.pending = Pending({}, {}, [])
        self.degraded = False
        return True

    def _down(self, exc: Exception, now: float) -> None:
        if not self.degraded:
            log.error("redis %s unreachable (%s): deciding from local state until it returns", self.state.url, exc)
            self.outages += 1
        self.degraded = True
        self._next_try = now + self.retry_s


US, RS = "\x1f", "\x1e"  # field and record separators of the script's arguments (rejected in names)
_ADMIT_REASONS = {
    "A|c": "oit: continuation",
    "A|a": "oit: continuation of an unknown interaction",
    "A|n": "oit: new interaction",
}


def _lim(per_min: float | None, per_window: float) -> str:
    return "-1" if per_min is None else repr(per_min * per_window)


def wall_clock() -> float:
    """Shared time base for replicas: the Redis windows compare times from different processes."""
    return time.time()
