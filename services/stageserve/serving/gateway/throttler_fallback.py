"""Fail-open admission while the throttler is unreachable: a local concurrency limit per tenant.

``gateway.throttler_failure_mode: fail-open`` (the default) keeps serving when the throttler is down, but
caps each tenant (user, app) at ``gateway.local_tenant_max_inflight`` concurrent requests so one tenant cannot
take the whole deployment while fairness is off. Every fallback admission is logged (once per outage).
"""

from __future__ import annotations

import logging

import grpc

from stageserve.serving.common.errors import Overloaded

log = logging.getLogger("stageserve.gateway")
# Statuses that mean the throttler is down or unreachable (anything else is its answer and is passed on).
THROTTLER_DOWN = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
)


class LocalTenantLimiter:
    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.inflight: dict[tuple[str, str], int] = {}
        self._owner: dict[str, tuple[str, str]] = {}
        self.fallback_admissions = 0  # counter hook for metrics
        self._outage = False

    def admit(self, request_id: str, tenant: tuple[str, str], reason: str) -> None:
        """Admits locally or raises Overloaded (429) when the tenant is at its local limit."""
        if not self._outage:
            log.warning("throttler unreachable (%s): failing open with %d in flight per tenant", reason,
                        self.max_inflight)
            self._outage = True
        if self.inflight.get(tenant, 0) >= self.max_inflight:
            raise Overloaded(
                f"throttler unavailable; tenant {tenant[0]}/{tenant[1]} is at its local limit of "
                f"{self.max_inflight} concurrent requests",
                retry_after_s=1.0,
            )
        self.inflight[tenant] = self.inflight.get(tenant, 0) + 1
        self._owner[request_id] = tenant
        self.fallback_admissions += 1

    def release(self, request_id: str) -> bool:
        """True if the request was admitted locally (and is now released)."""
        tenant = self._owner.pop(request_id, None)
        if tenant is None:
            self._outage = self._outage and bool(self._owner)
            return False
        self.inflight[tenant] -= 1
        if not self.inflight[tenant]:
            del self.inflight[tenant]
        return True
