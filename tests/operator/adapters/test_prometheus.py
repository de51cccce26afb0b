"""The Prometheus adapter against a real Prometheus scraping real prometheus_client metrics (DESIGN §3 names)."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from stageserve_operator.adapters.prometheus import Prometheus, PrometheusError

from ..conftest import free_port, wait_for


def serve_stage_metrics():
    """One registry per stage, as each stage process exports them, on its own metrics port."""
    reg = {s: CollectorRegistry() for s in ("encoder", "prefill", "decode")}
    m = {
        "img": Counter("stageserve_encoder_image_tokens", "image tokens encoded", registry=reg["encoder"]),
        "pending": Gauge("stageserve_encoder_pending_image_tokens", "pending", registry=reg["encoder"]),
        "prompt": Counter("vllm:prompt_tokens", "prompt tokens", ["model_name"], registry=reg["prefill"]),
        "waiting": Gauge("vllm:num_requests_waiting", "waiting", ["model_name"], registry=reg["prefill"]),
        "ttft": Histogram("vllm:time_to_first_token_seconds", "ttft", ["model_name"], registry=reg["prefill"],
                          buckets=(0.5, 1.0, 2.0, 4.0)),
        "gen": Counter("vllm:generation_tokens", "generated", ["model_name"], registry=reg["decode"]),
        "running": Gauge("vllm:num_requests_running", "running", ["model_name"], registry=reg["decode"]),
        "kv": Gauge("vllm:kv_cache_usage_perc", "kv", ["model_name"], registry=reg["decode"]),
    }
    ports, servers = {}, []
    for stage, r in reg.items():
        ports[stage] = free_port()
        servers.append(start_http_server(ports[stage], addr="127.0.0.1", registry=r))
    return m, ports, servers


def test_stage_load_from_a_real_prometheus(start_prometheus):
    m, ports, servers = serve_stage_metrics()
    try:
        url = start_prometheus({
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "stages", "static_configs": [
                {"targets": [f"127.0.0.1:{ports[s]}"], "labels": {"stage": s}} for s in ports]}],
        })
        prom = Prometheus(url)
        m["pending"].set(3000)
        m["waiting"].labels("m").set(2)
        m["running"].labels("m").set(17)
        m["kv"].labels("m").set(0.42)
        for v in (0.3, 0.3, 0.7, 1.5, 3.0):  # 2 under 0.5 s, 1 in (0.5, 1], 1 in (1, 2], 1 in (2, 4]
            m["ttft"].labels("m").observe(v)
        wait_for(lambda: prom.scalar('up{stage="decode"}') == 1 and prom.scalar('up{stage="encoder"}') == 1,
                 20, what="targets up")
        running = 'sum({__name__=~"vllm[:_]num_requests_running",stage="decode"})'
        wait_for(lambda: prom.scalar(running) == 17, 20, what="gauges")
        # steady counters: +1000 image tokens, +500 prompt tokens, +50 generated per 0.25 s, for 6 s
        for _ in range(24):
            m["img"].inc(1000)
            m["prompt"].labels("m").inc(500)
            m["gen"].labels("m").inc(50)
            m["ttft"].labels("m").observe(0.3)
            time.sleep(0.25)
        enc = prom.stage_load("encoder", "5s", slo_s=1.0)
        pre = prom.stage_load("prefill", "5s", slo_s=1.0)
        dec = prom.stage_load("decode", "5s", slo_s=0.1)
        assert 2500 < enc.tokens_per_s < 5500 and enc.pending_tokens == 3000  # ~4000 tok/s
        assert 1200 < pre.tokens_per_s < 2800 and pre.pending_tokens == 2 * 512  # ~2000 tok/s
        assert 120 < dec.tokens_per_s < 280 and dec.running_seqs == 17 and dec.kv_usage == pytest.approx(0.42)
        assert pre.slo_attainment is not None and 0.5 < pre.slo_attainment <= 1.0  # all recent TTFTs are 0.3 s
        assert dec.slo_attainment is None  # no ITL histogram exported: no SLO signal, not a made-up one
        with pytest.raises(PrometheusError, match="bad_data|parse"):
            prom.query("sum(rate(")
    finally:
        for server, _thread in servers:
            server.shutdown()


def test_unreachable_prometheus_is_a_clear_error():
    with pytest.raises(PrometheusError, match="query"):
        Prometheus(f"http://127.0.0.1:{free_port()}", timeout_s=1).query("up")
