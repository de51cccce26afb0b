"""Virtual Token Counter scheduling (Sheng et al., OSDI '24): the fairness baseline.

What: one service counter per user. Admitting a call adds w_in·prompt/weight; every reported output token
adds w_out/weight. `pop_next` serves the backlogged user (one with queued calls) whose counter is lowest,
FIFO within a user. A user who becomes backlogged is lifted to the minimum counter of the other backlogged
users, or, when nobody else is backlogged, to the counter the last departing user had when it left the
queue, so idle time cannot be banked as credit.
Unit of fairness: the user (weighted tokens served). Calls, apps and interactions are not seen.
Inputs: `Call.user`, `Call.input_tokens + Call.system_tokens` (VTC does not tell them apart), reported
output tokens; `now` is accepted for the interface but not used.
Configuration: `VTCConfig(w_in=1, w_out=2, default_weight=1)`; per-user weights (`set_weight`).
Trade-offs: with two users backlogged over an interval, |W_f − W_g| ≤ 2·max(w_in·L_in_max, w_out·M)
(M = most tokens in a running batch), and it is work-conserving; but every token costs the same for every
app, so a normal user of a long-system-prompt app looks heavy (WSC fixes that). `pop_next` scans the
backlogged users: O(users) per admission.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from stageserve.policy.fairness.types import Call, Fits

NAME = "vtc"


@dataclass(frozen=True)
class VTCConfig:
    w_in: float = 1.0
    w_out: float = 2.0
    default_weight: float = 1.0


@dataclass
class RunningCall:
    call: Call
    per_token_charge: float  # frozen at admission
    output_tokens: int = 0


class VTC:
    name = NAME

    def __init__(self, config: VTCConfig | None = None, weights: Mapping[str, float] | None = None) -> None:
        self.config = config or VTCConfig()
        self._weights: dict[str, float] = dict(weights or {})
        self._counters: dict[str, float] = {}
        self._backlog: dict[str, deque[tuple[int, Call]]] = {}  # only users with queued calls
        self._running: dict[str, RunningCall] = {}
        self._seq = 0
        self._last_departed: float | None = None
        self.lifts = 0

    # ---- interface ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(q) for q in self._backlog.values())

    def weight(self, user: str) -> float:
        return self._weights.get(user, self.config.default_weight)

    def set_weight(self, user: str, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        self._weights[user] = weight

    def enqueue(self, call: Call, now: float) -> None:
        self._counters.setdefault(call.user, 0.0)
        if call.user not in self._backlog:
            self._lift(call.user)
            self._backlog[call.user] = deque()
        self._backlog[call.user].append((self._seq, call))
        self._seq += 1

    def pop_next(self, now: float, fits: Fits) -> Call | None:
        if not self._backlog:
            return None
        user = self._pick_user(now)
        call = self._backlog[user][0][1]
        if not fits(call):
            return None
        self._backlog[user].popleft()
        self._admit(call, now)
        if not self._backlog[user]:
            self._depart(user)
        return call

    def on_output_tokens(self, request_id: str, k: int, now: float) -> None:
        running = self._running.get(request_id)
        if running is None:
            return
        running.output_tokens += k
        self._counters[running.call.user] += k * running.per_token_charge
        self._touch(running.call, now)

    def on_finish(self, request_id: str, now: float) -> None:
        running = self._running.pop(request_id, None)
        if running is None:
            self.cancel(request_id, now)
            return
        self._finished(running, now)

    def cancel(self, request_id: str, now: float) -> bool:
        """Drops a queued call (client went away). Running calls are ended with `on_finish`."""
        for user, queue in self._backlog.items():
            for item in queue:
                if item[1].request_id == request_id:
                    queue.remove(item)
                    if not queue:
                        self._depart(user)
                    return True
        return False

    def backlogged_users(self) -> frozenset[str]:
        return frozenset(self._backlog)

    def sync_counters(self, values: Mapping[str, float]) -> None:
        """Replaces users' counters with shared values (throttler replicas sharing state in Redis)."""
        self._counters.update(values)

    def counters(self) -> Mapping[str, float]:
        return dict(self._counters)

    def running(self) -> Mapping[str, RunningCall]:
        return dict(self._running)

    # ---- policy hooks (WSC overrides these) ---------------------------------------------------------
    def admission_charge(self, call: Call) -> float:
        return self.config.w_in * call.prompt_tokens / self.weight(call.user)

    def output_charge(self, call: Call) -> float:
        """Counter increase per output token of `call`."""
        return self.config.w_out / self.weight(call.user)

    def _pick_user(self, now: float) -> str:
        return min(self._backlog, key=self._rank)

    def _finished(self, running: RunningCall, now: float) -> None:
        pass

    def _touch(self, call: Call, now: float) -> None:
        pass

    # ---- internals ----------------------------------------------------------------------------------
    def _rank(self, user: str) -> tuple[float, int]:
        return self._counters[user], self._backlog[user][0][0]

    def _lift(self, user: str) -> None:
        others = [self._counters[v] for v in self._backlog if v != user]
        floor = min(others) if others else self._last_departed
        if floor is not None and floor > self._counters[user]:
            self._counters[user] = floor
            self.lifts += 1

    def _admit(self, call: Call, now: float) -> None:
        self._counters[call.user] += self.admission_charge(call)
        self._running[call.request_id] = RunningCall(call, self.output_charge(call))
        self._touch(call, now)

    def _depart(self, user: str) -> None:
        del self._backlog[user]
        self._last_departed = self._counters[user]
