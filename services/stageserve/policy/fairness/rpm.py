"""Per-call requests-per-minute limiter (the baseline FairServe argues against).

What: each CALL is counted in a sliding window (60 s) per user and, optionally, per app; a call that would
exceed a limit is rejected with the exact time until the oldest entry leaves the window. Rejected calls are
not counted.
Unit of fairness: calls per user (and per app), whatever their size.
Inputs: `Call.user`, `Call.app`, `now`. The engine load is ignored: it throttles even when idle.
Configuration: `RPMConfig(user_rpm, app_rpm=None, window_s=60)`; a limit of None means unlimited.
Trade-offs: simple and predictable, but it is blind to load (throttles idle capacity), to call size (a
light user of a heavy app counts like anyone) and to interactions: it rejects call k of an interaction
whose calls 0..k-1 already spent tokens (see the unit tests), so those tokens are wasted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from stageserve.policy.fairness.types import Admit, Call, Reject, SlidingWindow

NAME = "rpm"


@dataclass(frozen=True)
class RPMConfig:
    user_rpm: int | None = 60
    app_rpm: int | None = None
    window_s: float = 60.0


class RPMLimiter:
    name = NAME

    def __init__(self, config: RPMConfig | None = None) -> None:
        self.config = config or RPMConfig()
        window = self.config.window_s
        self._user: defaultdict[str, SlidingWindow] = defaultdict(lambda: SlidingWindow(window))
        self._app: defaultdict[str, SlidingWindow] = defaultdict(lambda: SlidingWindow(window))
        self.admitted = 0
        self.rejected = 0

    def export(self, now: float) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Call times in the window per user and per app (to rebuild a shared store)."""
        return {u: w.times(now) for u, w in self._user.items()}, {a: w.times(now) for a, w in self._app.items()}

    def check(self, call: Call, now: float) -> Admit | Reject:
        """Admit and count the call, or reject it with the time until its window has room."""
        wait, reason = self._wait(call, now)
        if wait > 0.0:
            self.rejected += 1
            return Reject(retry_after_s=wait, reason=reason)
        self._user[call.user].record(now)
        self._app[call.app].record(now)
        self.admitted += 1
        return Admit(reason=NAME)

    def _wait(self, call: Call, now: float) -> tuple[float, str]:
        user_wait = _until_room(self._user[call.user], self.config.user_rpm, now)
        app_wait = _until_room(self._app[call.app], self.config.app_rpm, now)
        if user_wait >= app_wait:
            return user_wait, f"rpm: user {call.user} over {self.config.user_rpm}/window"
        return app_wait, f"rpm: app {call.app} over {self.config.app_rpm}/window"


def _until_room(window: SlidingWindow, limit: int | None, now: float) -> float:
    return 0.0 if limit is None else window.time_until_below(limit, now)
