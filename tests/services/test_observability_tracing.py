"""One trace per request across the real pipeline processes: the gateway's HTTP (or gRPC) server span, its
GenAI span, then client and server spans of every hop and prefill's kv_transfer span, linked by W3C
traceparent through HTTP headers and gRPC metadata."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import httpx

from stageserve.v1 import gateway_pb2, gateway_pb2_grpc

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


HOPS = {
    "stageserve.v1.Throttler/Admit", "stageserve.v1.Prefill/Prefill", "stageserve.v1.Decode/Generate",
    "stageserve.v1.Decode/PushKV", "kv_transfer",
}  # fmt: skip


def _spans(trace_dir: Path, trace_id: str, expected: set[str], timeout_s: float = 30.0) -> list[dict]:
    """The spans of ``trace_id`` once every name in ``expected | HOPS`` has been written, by both sides of each
    RPC (processes write each span as it ends; a client span ends a moment after its call completes)."""
    expected = expected | HOPS
    deadline = time.monotonic() + timeout_s
    while True:
        spans = []
        for file in trace_dir.glob("*.jsonl"):
            for line in file.read_text().splitlines():
                if line.strip():
                    span = json.loads(line)
                    if span["trace_id"] == trace_id:
                        spans.append(span)
        names = [s["name"] for s in spans]
        rpcs_done = all(names.count(n) >= 2 for n in expected if n.startswith("stageserve.v1."))
        if (expected <= set(names) and rpcs_done) or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def _one(spans: list[dict], name: str, kind: str | None = None) -> dict:
    found = [s for s in spans if s["name"] == name and (kind is None or s["kind"] == kind)]
    assert len(found) == 1, f"expected one {kind or ''} span {name!r}, got {[(s['name'], s['kind']) for s in spans]}"
    return found[0]


def _child(spans: list[dict], parent: dict, name: str, kind: str) -> dict:
    span = _one(spans, name, kind)
    assert span["parent_span_id"] == parent["span_id"], f"{name} ({kind}) is not a child of {parent['name']}"
    return span


def _assert_hops(spans: list[dict], generation: dict) -> None:
    """throttler, prefill (with its kv_transfer to decode) and decode hang under the gateway's GenAI span."""
    for service, method in (("Throttler", "Admit"), ("Prefill", "Prefill"), ("Decode", "Generate")):
        name = f"stageserve.v1.{service}/{method}"
        client = _child(spans, generation, name, "CLIENT")
        server = _child(spans, client, name, "SERVER")
        assert server["service"] == f"stageserve-{service.lower()}"
    prefill = _one(spans, "stageserve.v1.Prefill/Prefill", "SERVER")
    assert prefill["attributes"]["gen_ai.usage.input_tokens"] == generation["attributes"]["gen_ai.usage.input_tokens"]
    kv = _child(spans, prefill, "kv_transfer", "INTERNAL")
    attrs = kv["attributes"]
    assert attrs["stageserve.kv.format"] in ("bf16", "fp8", "hack2", "hack4", "hack-k4v2", "kivi2")
    assert attrs["stageserve.kv.bytes"] > 0 and attrs["stageserve.kv.pages"] > 0
    assert attrs["stageserve.kv.tokens"] == generation["attributes"]["gen_ai.usage.input_tokens"]
    push = _child(spans, kv, "stageserve.v1.Decode/PushKV", "CLIENT")
    _child(spans, push, "stageserve.v1.Decode/PushKV", "SERVER")
    decode = _one(spans, "stageserve.v1.Decode/Generate", "SERVER")
    assert decode["attributes"]["gen_ai.usage.output_tokens"] == generation["attributes"]["gen_ai.usage.output_tokens"]
    assert all(s["end_ns"] >= s["start_ns"] for s in spans)


def test_http_request_is_one_trace_across_every_process(pipeline, pipeline_trace_dir):
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "stream": True}
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x-stageserve-app": "trace-test"}
    with httpx.stream(
        "POST", f"{pipeline.openai_base_url}/chat/completions", json=body, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200
        assert r.headers["traceparent"].split("-")[1] == CLIENT_TRACE  # the gateway continues the caller's trace
        text = "".join(r.iter_text())
    assert "[DONE]" in text

    spans = _spans(pipeline_trace_dir, CLIENT_TRACE, {"POST /v1/chat/completions", "stageserve.v1.Throttler/Release"})
    assert {s["service"] for s in spans} >= {f"stageserve-{s}" for s in ("gateway", "throttler", "prefill", "decode")}
    server = _one(spans, "POST /v1/chat/completions", "SERVER")
    assert server["parent_span_id"] == CLIENT_SPAN and server["attributes"]["http.response.status_code"] == 200
    generation = _one(spans, "chat SmolLM2-135M-Instruct")
    assert generation["parent_span_id"] == server["span_id"]
    attrs = generation["attributes"]
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "SmolLM2-135M-Instruct"
    assert attrs["gen_ai.request.max_tokens"] == 4 and attrs["gen_ai.usage.output_tokens"] == 4
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["stageserve.app"] == "trace-test"
    _assert_hops(spans, generation)
    _child(spans, generation, "stageserve.v1.Throttler/Release", "CLIENT")


def test_grpc_request_continues_traceparent_from_metadata(pipeline, pipeline_trace_dir):
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"

    async def call() -> None:
        async with grpc.aio.insecure_channel(pipeline.gateway_grpc) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.GenerateRequest(prompt="The sky is")
            request.sampling.max_tokens = 3
            metadata = (("traceparent", f"00-{trace_id}-{parent}-01"),)
            events = [e async for e in stub.Generate(request, metadata=metadata, timeout=120)]
            assert events[-1].finish_reason

    asyncio.run(call())
    spans = _spans(pipeline_trace_dir, trace_id, {"stageserve.v1.Gateway/Generate"})
    server = _one(spans, "stageserve.v1.Gateway/Generate", "SERVER")
    assert server["parent_span_id"] == parent and server["service"] == "stageserve-gateway"
    generation = _child(spans, server, "text_completion SmolLM2-135M-Instruct", "INTERNAL")
    _assert_hops(spans, generation)
