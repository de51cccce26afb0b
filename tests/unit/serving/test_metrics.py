"""The metric helpers of serving/common/metrics.py: names, label caps, timers, per-stage groups."""

from __future__ import annotations

import pytest

from stageserve.serving.common import metrics


@pytest.fixture
def registry():
    reg = metrics.CollectorRegistry()
    metrics.enable("engine", "kv_transfer", "throttler", "encoder", "gateway", registry=reg)
    return reg


def test_label_cap_keeps_first_values_then_other():
    cap = metrics.LabelCap(limit=2, max_len=5)
    assert [cap("a"), cap("b"), cap("c"), cap("a"), cap(""), cap("toolongvalue")] == [
        "a", "b", "other", "a", "other", "other",
    ]  # fmt: skip
    wide = metrics.LabelCap(limit=3, max_len=4)
    assert wide("") == "unknown" and wide("abcdefg") == "abcd" and wide("abcdxyz") == "abcd"
    with pytest.raises(ValueError, match="limit"):
        metrics.LabelCap(limit=0)


def test_vllm_names_are_exported_with_model_name(registry):
    metrics.bind_engine_load("m", lambda: type("L", (), {"num_waiting": 3, "num_running": 2, "kv_cache_usage": 0.25}))
    metrics.count_prompt_tokens("m", 7)
    text = metrics.render(registry).decode()
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket"):  # fmt: skip
        assert any(line.startswith(name + "{") and 'model_name="m"' in line for line in text.splitlines()), name
    assert registry.get_sample_value("vllm:num_requests_waiting", {"model_name": "m"}) == 3
    assert registry.get_sample_value("vllm:kv_cache_usage_perc", {"model_name": "m"}) == 0.25
    assert registry.get_sample_value("vllm:prompt_tokens_total", {"model_name": "m"}) >= 7


def test_request_timer_records_ttft_then_itl_per_token_then_e2e(registry):
    labels = {"model_name": "timer-model"}
    timer = metrics.engine_timer("timer-model", start=10.0)
    timer.tokens(1, 10.5)  # first token after 0.5 s
    timer.tokens(2, 10.7)  # two tokens in 0.2 s: two gaps of 0.1 s
    timer.tokens(0, 11.0)  # an event without tokens changes nothing
    timer.finish(11.0)
    timer.finish(12.0)  # once only
    get = registry.get_sample_value
    assert get("vllm:time_to_first_token_seconds_sum", labels) == pytest.approx(0.5)
    assert get("vllm:inter_token_latency_seconds_count", labels) == 2
    assert get("vllm:inter_token_latency_seconds_sum", labels) == pytest.approx(0.2)
    assert get("vllm:e2e_request_latency_seconds_count", labels) == 1
    assert get("vllm:e2e_request_latency_seconds_sum", labels) == pytest.approx(1.0)


def test_kv_transfer_series_start_at_zero_and_count_per_format(registry):
    metrics.init_kv_transfer(["fmt-a", "fmt-b"])
    get = registry.get_sample_value
    assert get("stageserve_kv_transfer_failures_total", {"reason": "checksum"}) is not None
    before = get("stageserve_kv_transfer_bytes_total", {"format": "fmt-a"})
    metrics.record_kv_transfer("fmt-a", payload_bytes=100, bf16_bytes=400, tokens=5, seconds=0.01)
    assert get("stageserve_kv_transfer_bytes_total", {"format": "fmt-a"}) == before + 100
    assert get("stageserve_kv_transfer_bf16_bytes_total", {"format": "fmt-a"}) >= 400
    assert get("stageserve_kv_transfer_bytes_total", {"format": "fmt-b"}) == 0
    with pytest.raises(ValueError, match="reason"):
        metrics.kv_transfer_failed("cosmic-rays")


def test_throttle_recorder_counts_each_throttled_interaction_once(registry):
    recorder = metrics.ThrottleRecorder(remember=2)
    get = registry.get_sample_value
    app = metrics.APP_LABEL("fair-app")
    before = get("stageserve_throttler_throttled_interactions_total", {"app": app}) or 0
    for decision, interaction in [("admitted", "i1"), ("queued", "i1"), ("rejected", "i1"), ("queued", "i2")]:
        recorder.decision(decision, "fair-app", interaction)
    assert get("stageserve_throttler_throttled_interactions_total", {"app": app}) == before + 2
    assert get("stageserve_throttler_decisions_total", {"decision": "queued", "app": app}) >= 2
    with pytest.raises(ValueError, match="decision"):
        recorder.decision("maybe", "fair-app")


def test_groups_keep_other_stages_series_out():
    reg = metrics.CollectorRegistry()
    metrics.enable("throttler", registry=reg)
    metrics.enable("throttler", registry=reg)  # idempotent
    text = metrics.render(reg).decode()
    assert "stageserve_throttler_overloaded" in text and "stageserve_stage_info" in text
    assert "vllm:" not in text and "stageserve_encoder" not in text
    with pytest.raises(ValueError, match="unknown"):
        metrics.enable("nope", registry=reg)


def test_served_exposition_keeps_vllm_colons_even_when_openmetrics_is_asked(registry):
    import urllib.request

    server = metrics.serve(0, "127.0.0.1", registry=registry)
    try:
        port = server.server_address[1]
        accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"  # what Prometheus sends
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "\nvllm:generation_tokens_total{" in text and "vllm_generation" not in text
    finally:
        server.shutdown()


def test_gateway_callback_counters_read_their_owner_at_scrape_time():
    reg = metrics.CollectorRegistry()
    metrics.enable("gateway", registry=reg)
    state = {"n": 1}
    metrics.bind_gateway_counters({"stageserve_gateway_migrations": lambda: state["n"]})
    assert reg.get_sample_value("stageserve_gateway_migrations_total") == 1
    state["n"] = 4
    assert reg.get_sample_value("stageserve_gateway_migrations_total") == 4
    with pytest.raises(KeyError):
        metrics.bind_gateway_counters({"stageserve_gateway_made_up": lambda: 0})


def test_bind_throttler_reads_state_at_scrape_time_and_returns_the_listener(registry):
    state = {"overloaded": False, "gap": 12.5, "queued": 3}
    listener = metrics.bind_throttler(lambda: state["overloaded"], lambda: state["gap"], lambda: state["queued"])
    get = registry.get_sample_value
    assert (get("stageserve_throttler_overloaded"), get("stageserve_throttler_service_gap_tokens")) == (0, 12.5)
    assert get("stageserve_throttler_queued_requests") == 3
    state["overloaded"] = True
    assert get("stageserve_throttler_overloaded") == 1
    app = metrics.APP_LABEL("bound-app")
    listener("rejected", "bound-app", "interaction-x")
    listener("admitted", "bound-app")  # the two-argument form the servicer may use
    assert get("stageserve_throttler_decisions_total", {"decision": "rejected", "app": app}) >= 1
    assert get("stageserve_throttler_throttled_interactions_total", {"app": app}) >= 1
