"""Tracing setup from the environment, the JSON-lines exporter, and span context around async streams."""

from __future__ import annotations

import asyncio
import json

import pytest
from opentelemetry import trace

from stageserve.serving.common import tracing


def test_exporters_follow_the_otel_environment(tmp_path):
    def kinds(env):
        return [type(p.span_exporter).__name__ for p in tracing._processors("prefill", 0, env)]

    assert kinds({}) == []  # off unless configured
    assert kinds({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}) == ["OTLPSpanExporter"]
    assert kinds({"OTEL_TRACES_EXPORTER": "console"}) == ["ConsoleSpanExporter"]
    assert kinds({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}) == []
    assert kinds({tracing.TRACE_DIR_ENV: str(tmp_path)}) == ["JsonLinesSpanExporter"]
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        kinds({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        kinds({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert tracing.setup("prefill", environ={"OTEL_SDK_DISABLED": "true"}) is None


def test_traced_stream_links_children_and_ends_the_span(tmp_path):
    provider = tracing.TracerProvider()
    path = tmp_path / "spans.jsonl"
    provider.add_span_processor(tracing.SimpleSpanProcessor(tracing.JsonLinesSpanExporter(path)))
    tracer = provider.get_tracer("test")

    async def inner():
        for i in range(3):
            with tracer.start_as_current_span(f"step-{i}"):
                await asyncio.sleep(0)
            yield i

    async def main():
        parent = tracer.start_span("generate")
        seen = []
        async for _item in tracing.traced_stream(inner(), parent, seen.append):
            assert not trace.get_current_span().get_span_context().is_valid  # the caller's context is untouched
        return seen, parent

    seen, parent = asyncio.run(main())
    assert seen == [0, 1, 2]
    spans = [json.loads(line) for line in path.read_text().splitlines()]
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {"generate", "step-0", "step-1", "step-2"}  # the parent was ended too
    parent_id = f"{parent.get_span_context().span_id:016x}"
    assert all(by_name[f"step-{i}"]["parent_span_id"] == parent_id for i in range(3))
    assert len({s["trace_id"] for s in spans}) == 1
