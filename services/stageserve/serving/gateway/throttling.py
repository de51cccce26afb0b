"""What the gateway tells the throttler besides Admit: token counts as decode progresses, and engine loads.

- `expected_counts`: Admit's expected counts (input without system prompt, system prompt, max_tokens).
- `TokenProgress`: counts a call's output tokens and sends `ReportTokens` every `every` tokens (in the
  background, so a slow throttler never stalls the stream); `final()` gives Release's real counts.
- `forward_loads`: after each poll of the prefill/decode replicas (`GetLoad`), the gateway forwards those
  `StageLoad`s to the throttler's `ReportLoad`, which is how the throttler learns about overload
  (KV usage, queued prefill tokens). `gateway.report_loads: false` turns it off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import grpc

from stageserve.serving.gateway.http import HttpGenerateRequest
from stageserve.v1 import common_pb2, throttler_pb2

log = logging.getLogger("stageserve.gateway")


def expected_counts(request: HttpGenerateRequest) -> common_pb2.TokenCounts:
    total = len(request.prompt_token_ids)
    system = min(request.system_tokens, total)
    return common_pb2.TokenCounts(input=total - system, system=system, output=request.params.max_tokens)


class TokenProgress:
    def __init__(self, stub: Any, request: HttpGenerateRequest, every: int = 16) -> None:
        self.stub = stub
        self.request_id = request.request_id
        self.expected = expected_counts(request)
        self.every = every
        self.output = 0
        self._reported = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, new_tokens: int, total: int = 0) -> None:
        """`new_tokens` arrived (or the stage says the total is `total`)."""
        self.output = max(self.output + new_tokens, total)
        if self.output - self._reported >= self.every:
            self._reported = self.output
            task = asyncio.ensure_future(self._send(self.counts()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def counts(self) -> common_pb2.TokenCounts:
        e = self.expected
        return common_pb2.TokenCounts(input=e.input, system=e.system, output=self.output)

    async def _send(self, counts: common_pb2.TokenCounts) -> None:
        try:
            report = throttler_pb2.TokenReport(request_id=self.request_id, counts=counts)
            await self.stub.ReportTokens(report, timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            log.debug("throttler token report failed for %s: %s", self.request_id, exc.code().name)


async def forward_loads(stub: Any, replica_sets: Iterable[Any]) -> None:
    """Sends each polled replica's last `StageLoad` to the throttler (best effort)."""
    reports = []
    for replicas in replica_sets:
        for address, load in getattr(replicas, "raw", {}).items():
            report = common_pb2.StageLoad()
            report.CopyFrom(load)
            report.stage, report.address = replicas.stage, address
            report.replica_id = report.replica_id or address
            reports.append(stub.ReportLoad(report, timeout=1.0))
    results = await asyncio.gather(*reports, return_exceptions=True)
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        log.debug("throttler load report failed: %s", failed[0])
