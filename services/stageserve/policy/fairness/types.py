"""Value types shared by the fairness policies, the Scheduler protocol, and a sliding-window counter.

A `Call` is one LLM call of a user interaction (the unit the throttler sees); `EngineLoad` is what the
engine reports about itself; `Admit` / `Queue` / `Reject` are the answers an admission policy gives.
`Scheduler` is the interface shared by fcfs / vtc / wsc so that the throttler service and the simulator
can swap them. Everything here is pure: time is always an argument (`now`, seconds), never read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeAlias


@dataclass(frozen=True)
class Call:
    """One LLM call. `input_tokens` excludes the system prompt; `system_tokens` counts it."""

    request_id: str
    user: str
    app: str
    interaction_id: str
    call_index: int = 0
    input_tokens: int = 0
    system_tokens: int = 0
    max_output_tokens: int = 0
    arrival: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.system_tokens


@dataclass(frozen=True)
class EngineLoad:
    """Engine state: KV occupancy in [0, 1], prompt tokens waiting for prefill, tokens per batch step."""

    kv_usage: float
    queued_prefill_tokens: int
    batch_token_budget: int


@dataclass(frozen=True)
class Admit:
    reason: str = ""


@dataclass(frozen=True)
class Queue:
    position: int
    reason: str = ""


@dataclass(frozen=True)
class Reject:
    retry_after_s: float
    reason: str


Decision: TypeAlias = Admit | Queue | Reject
Fits: TypeAlias = Callable[[Call], bool]


class Scheduler(Protocol):
    """Orders queued calls. The caller admits by `pop_next` while capacity remains, and reports progress.

    `pop_next` returns the call the policy wants next if `fits(call)`, else None (the caller stops filling
    the batch: skipping ahead would break the policy's order). `counters` is the service each user has
    received in the policy's own unit (raw weighted tokens for fcfs/vtc, normalised for wsc).
    """

    name: str

    def enqueue(self, call: Call, now: float) -> None: ...

    def pop_next(self, now: float, fits: Fits) -> Call | None: ...

    def on_output_tokens(self, request_id: str, k: int, now: float) -> None: ...

    def on_finish(self, request_id: str, now: float) -> None: ...

    def cancel(self, request_id: str, now: float) -> bool: ...

    def backlogged_users(self) -> frozenset[str]: ...

    def counters(self) -> Mapping[str, float]: ...

    def sync_counters(self, values: Mapping[str, float]) -> None: ...

    def __len__(self) -> int: ...


class SlidingWindow:
    """Event times in the last `window_s` seconds. An event at t counts while now < t + window_s."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._times and self._times[0] + self.window_s <= now:
            self._times.popleft()

    def count(self, now: float) -> int:
        self._expire(now)
        return len(self._times)

    def times(self, now: float) -> list[float]:
        """The event times still in the window (oldest first)."""
        self._expire(now)
        return list(self._times)

    def record(self, now: float) -> None:
        self._expire(now)
        self._times.append(now)

    def time_until_below(self, limit: float, now: float) -> float:
        """Seconds until fewer than `limit` events remain in the window (0 if already below)."""
        self._expire(now)
        excess = len(self._times) - max(0, _ceil(limit)) + 1  # events that must expire
        if excess <= 0:
            return 0.0
        if excess > len(self._times):  # limit <= 0: never gets below
            return float("inf")
        return self._times[excess - 1] + self.window_s - now


def _ceil(x: float) -> int:
    n = int(x)
    return n if n >= x else n + 1
