"""The operator's own metrics mirror the status it writes."""

from __future__ import annotations

from prometheus_client import generate_latest

from stageserve_operator.adapters.exporter import OperatorMetrics


def test_metrics_follow_the_status_and_drop_attainment_without_traffic():
    m = OperatorMetrics()
    m.record("llm", {"stages": {"prefill": {"replicas": 3, "desired": 4,
                                            "load": {"tokensPerSecond": 5100.5, "sloAttainment": 0.97}},
                                "gateway": {"replicas": 1}}})
    text = generate_latest(m.registry).decode()
    assert 'stageserve_replicas{deployment="llm",stage="prefill"} 3.0' in text
    assert 'stageserve_desired_replicas{deployment="llm",stage="prefill"} 4.0' in text
    assert 'stageserve_desired_replicas{deployment="llm",stage="gateway"} 1.0' in text
    assert 'stageserve_stage_load_tokens_per_second{deployment="llm",stage="prefill"} 5100.5' in text
    assert 'stageserve_slo_attainment{deployment="llm",stage="prefill"} 0.97' in text
    m.record("llm", {"stages": {"prefill": {"replicas": 2, "desired": 2, "load": {"tokensPerSecond": 0.0}}}})
    text = generate_latest(m.registry).decode()
    assert 'stageserve_replicas{deployment="llm",stage="prefill"} 2.0' in text
    assert 'stageserve_slo_attainment{deployment="llm",stage="prefill"}' not in text  # no traffic, no signal
