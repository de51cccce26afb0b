"""The always-admit policy: every call starts at once; nothing is queued or rejected.

Unit of fairness: none. Inputs: none. Configuration: none. Trade-off: no protection under overload; it is
the baseline the FairServe policies are measured against, and the default until one is configured.
"""

from __future__ import annotations

from dataclasses import dataclass

NAME = "always-admit"


@dataclass(frozen=True)
class Decision:
    admitted: bool
    queue_position: int = 0
    retry_after_s: float = 0.0
    reason: str = ""


class AlwaysAdmit:
    name = NAME

    def admit(self, request_id: str, now: float) -> Decision:
        return Decision(admitted=True, reason="always-admit policy")
