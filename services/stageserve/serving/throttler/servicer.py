"""Throttler shell: answers Admit from the configured policy; keeps per-call token counts."""

from __future__ import annotations

import time

import grpc

from stageserve.policy.fairness.always_admit import AlwaysAdmit
from stageserve.serving.common.errors import BadRequest, abort
from stageserve.v1 import common_pb2, throttler_pb2, throttler_pb2_grpc

POLICIES = {AlwaysAdmit.name: AlwaysAdmit}


class ThrottlerServicer(throttler_pb2_grpc.ThrottlerServicer):
    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"throttler.policy: unknown policy {policy!r} (known: {', '.join(POLICIES)})")
        self.policy = POLICIES[policy]()
        self.active: dict[str, common_pb2.TokenCounts] = {}
        self.loads: dict[str, common_pb2.StageLoad] = {}

    async def Admit(self, request: throttler_pb2.AdmitRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        if not request.request_id:
            await abort(context, BadRequest("request_id: required", field="request_id"))
        decision = self.policy.admit(request.request_id, time.monotonic())
        if decision.admitted:
            self.active[request.request_id] = common_pb2.TokenCounts()
            return throttler_pb2.AdmitResponse(
                decision=throttler_pb2.AdmitResponse.ADMITTED, reason=decision.reason, policy=self.policy.name
            )
        return throttler_pb2.AdmitResponse(
            decision=throttler_pb2.AdmitResponse.REJECTED,
            retry_after_s=decision.retry_after_s,
            reason=decision.reason,
            policy=self.policy.name,
        )

    async def AwaitAdmission(self, request: throttler_pb2.AwaitRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        admitted = request.request_id in self.active
        decision = throttler_pb2.AdmitResponse.ADMITTED if admitted else throttler_pb2.AdmitResponse.REJECTED
        return throttler_pb2.AdmitResponse(decision=decision, policy=self.policy.name)

    async def ReportTokens(self, request: throttler_pb2.TokenReport, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        if request.request_id in self.active:
            self.active[request.request_id].CopyFrom(request.counts)
        return throttler_pb2.ReportAck()

    async def Release(self, request: throttler_pb2.ReleaseRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        self.active.pop(request.request_id, None)
        return throttler_pb2.ReportAck()

    async def ReportLoad(self, request: common_pb2.StageLoad, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        self.loads[request.replica_id] = request
        return throttler_pb2.ReportAck()
