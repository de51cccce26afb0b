"""First-come-first-served scheduler: the throughput baseline with no fairness.

What: one global FIFO by arrival order; `pop_next` returns the head if it fits, else None (head-of-line
blocking, no skipping). It still keeps per-user service counters (w_in·prompt at admission, w_out per
reported output token) so that the simulator can measure the service gap FCFS produces.
Unit of fairness: none (calls, in arrival order).
Inputs: calls; output-token reports and finishes only feed the counters.
Configuration: `w_in`, `w_out` for the measurement counters (defaults 1 and 2, as VTC).
Trade-offs: maximal simplicity and the reference throughput; a user who floods the queue takes all
capacity and everyone behind waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from stageserve.policy.fairness.types import Call, Fits

NAME = "fcfs"


class FCFS:
    name = NAME

    def __init__(self, w_in: float = 1.0, w_out: float = 2.0) -> None:
        self.w_in = w_in
        self.w_out = w_out
        self._queue: deque[Call] = deque()
        self._running: dict[str, str] = {}  # request_id -> user
        self._service: dict[str, float] = {}
        self._queued_per_user: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def enqueue(self, call: Call, now: float) -> None:
        self._queue.append(call)
        self._queued_per_user[call.user] = self._queued_per_user.get(call.user, 0) + 1
        self._service.setdefault(call.user, 0.0)

    def pop_next(self, now: float, fits: Fits) -> Call | None:
        if not self._queue or not fits(self._queue[0]):
            return None
        call = self._queue.popleft()
        self._dequeued(call.user)
        self._running[call.request_id] = call.user
        self._service[call.user] += self.w_in * call.prompt_tokens
        return call

    def on_output_tokens(self, request_id: str, k: int, now: float) -> None:
        user = self._running.get(request_id)
        if user is not None:
            self._service[user] += self.w_out * k

    def on_finish(self, request_id: str, now: float) -> None:
        if self._running.pop(request_id, None) is None:
            self.cancel(request_id, now)

    def cancel(self, request_id: str, now: float) -> bool:
        for call in self._queue:
            if call.request_id == request_id:
                self._queue.remove(call)
                self._dequeued(call.user)
                return True
        return False

    def backlogged_users(self) -> frozenset[str]:
        return frozenset(self._queued_per_user)

    def sync_counters(self, values: Mapping[str, float]) -> None:
        """Replaces users' counters with shared values (throttler replicas sharing state in Redis)."""
        self._service.update(values)

    def counters(self) -> Mapping[str, float]:
        return dict(self._service)

    def _dequeued(self, user: str) -> None:
        left = self._queued_per_user[user] - 1
        if left:
            self._queued_per_user[user] = left
        else:
            del self._queued_per_user[user]
