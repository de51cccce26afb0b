"""`stageserve eval fairness --live URL`: replay a trace against a running pipeline's OpenAI HTTP API.

Arrivals keep the trace's spacing divided by `speedup`; token counts are multiplied by `token_scale` (a CPU
pipeline cannot serve the real lengths) and sent as words (about one token each) with `ignore_eos`, so the
model generates exactly max_tokens. Each call carries `x-stageserve-user/app/interaction-id/call-index`;
call k+1 of an interaction is sent when call k returned. A 429 on call 0 is a throttled interaction, on call
k > 0 a cut one (the remaining calls are not sent). Reported per run: calls ok / throttled / cut / failed and
the per-user end-to-end latency p50 / p99 (median over users, worst user).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx

from stageserve.policy.fairness.oit import percentile_of
from stageserve.tools.eval_fairness import CallSpec, Interaction


@dataclass
class LiveResult:
    ok: int = 0
    throttled: int = 0
    cut: int = 0
    failed: int = 0
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def summary(self) -> dict[str, float | int]:
        p50 = [percentile_of(v, 50) for v in self.latency.values() if v]
        p99 = [percentile_of(v, 99) for v in self.latency.values() if v]
        return {
            "ok": self.ok, "throttled_interactions": self.throttled, "cut_interactions": self.cut,
            "failed": self.failed, "user_p50_median_s": statistics.median(p50) if p50 else 0.0,
            "user_p99_max_s": max(p99, default=0.0),
        }


def _body(spec: CallSpec, scale: float) -> dict[str, object]:
    words = max(1, int(spec.input_tokens * scale))
    messages = []
    if spec.system_tokens:
        messages.append({"role": "system", "content": " ".join(["rule"] * max(1, int(spec.system_tokens * scale)))})
    messages.append({"role": "user", "content": " ".join(["hello"] * words)})
    return {"messages": messages, "max_tokens": max(1, int(spec.output_tokens * scale)), "ignore_eos": True,
            "temperature": 0.0}


async def _interaction(client: httpx.AsyncClient, url: str, it: Interaction, scale: float, res: LiveResult) -> None:
    for k, spec in enumerate(it.calls):
        headers = {"x-stageserve-user": it.user, "x-stageserve-app": it.app,
                   "x-stageserve-interaction-id": it.iid, "x-stageserve-call-index": str(k)}
        t0 = time.monotonic()
        try:
            r = await client.post(f"{url}/chat/completions", json=_body(spec, scale), headers=headers)
        except httpx.HTTPError:
            res.failed += 1
            return
        if r.status_code == 429:
            if k == 0:
                res.throttled += 1
            else:
                res.cut += 1
            return
        if r.status_code != 200:
            res.failed += 1
            return
        res.ok += 1
        res.latency[it.user].append(time.monotonic() - t0)


async def replay(url: str, trace: list[Interaction], speedup: float, scale: float, timeout_s: float) -> LiveResult:
    res = LiveResult()
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=256)) as client:
        tasks = []
        for it in trace:
            delay = it.start / speedup - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_interaction(client, url, it, scale, res)))
        await asyncio.gather(*tasks)
    return res
