"""PromQL construction, SLO attainment from histogram buckets, and the capacity-model simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stageserve_operator import metrics
from stageserve_operator.sim import DayLoad, SimConfig, StageTrace, peak_replicas, simulate


def test_queries_use_the_design_names_with_stage_labels_and_escaped_colons():
    q = metrics.stage_queries("prefill", "2m", deployment="llm")
    assert q["tokens_per_s"] == ('sum(rate({__name__=~"vllm[:_]prompt_tokens_total",stage="prefill",'
                                 'deployment="llm"}[2m]))')
    enc = metrics.stage_queries("encoder", "1m")
    assert enc["pending_tokens"] == 'sum(stageserve_encoder_pending_image_tokens{stage="encoder"})'
    assert "vllm[:_]inter_token_latency_seconds_bucket" in metrics.slo_histogram_query("decode", "1m")
    assert metrics.slo_histogram_query("encoder", "1m") is None
    with pytest.raises(ValueError):
        metrics.stage_queries("gateway", "1m")


def test_attainment_interpolates_inside_the_bucket():
    buckets = {0.5: 50.0, 1.0: 80.0, 2.0: 95.0, math.inf: 100.0}  # cumulative rates
    assert metrics.attainment(buckets, 1.0) == pytest.approx(0.80)
    assert metrics.attainment(buckets, 1.5) == pytest.approx(0.875)  # halfway from 80 to 95
    assert metrics.attainment(buckets, 0.25) == pytest.approx(0.25)
    assert metrics.attainment(buckets, 10.0) == pytest.approx(0.95)  # beyond the last finite bound
    assert metrics.attainment({0.5: 0.0, math.inf: 0.0}, 1.0) is None  # no traffic: no signal
    assert metrics.attainment({}, 1.0) is None


def day(tokens_per_stage: dict[str, np.ndarray]) -> DayLoad:
    n = len(next(iter(tokens_per_stage.values())))
    reqs = np.full(n, 10.0)
    return DayLoad({s: StageTrace(t.astype(float), reqs) for s, t in tokens_per_stage.items()}, reqs)


CFG = SimConfig(capacity={"encoder": 1000.0, "prefill": 1000.0, "decode": 1000.0})


def test_constant_load_autoscaler_equals_static_and_meets_the_slo():
    n = 3 * 3600
    load = day({s: np.full(n, 2500.0) for s in ("encoder", "prefill", "decode")})
    auto, static = simulate(load, CFG), simulate(load, CFG, static=peak_replicas(load, CFG))
    assert peak_replicas(load, CFG) == {"encoder": 3, "prefill": 3, "decode": 3}
    assert auto.attainment == static.attainment == 1.0
    assert auto.gpu_hours == pytest.approx(static.gpu_hours) == pytest.approx(27.0)
    assert auto.changes == 0


def test_one_peak_hour_in_six_saves_gpu_hours_and_scale_up_lag_costs_little_attainment():
    n = 6 * 3600
    t = np.arange(n)
    tokens = np.where((t >= 2 * 3600) & (t < 3 * 3600), 6000.0, 1000.0)
    load = day({s: tokens for s in ("encoder", "prefill", "decode")})
    auto, static = simulate(load, CFG), simulate(load, CFG, static=peak_replicas(load, CFG))
    assert static.gpu_hours == pytest.approx(3 * 6 * 6)
    assert auto.gpu_hours < 0.55 * static.gpu_hours
    assert 0.97 < auto.attainment < 1.0  # the 120 s start-up of new replicas under a 6x step
    enc = auto.replicas["encoder"]
    assert enc[2 * 3600 - 1] == 1 and enc[2 * 3600 + 300] == 6  # up within the start-up time
    assert enc[3 * 3600 + 600] == 6  # held through the 15-minute window
    assert enc[-1] == 1  # and back down in the end
