"""Turns on a stage process's observability: its tracer provider, its metric groups, ``stageserve_stage_info``
and (every stage but the gateway, which serves ``GET /metrics`` on its HTTP port) the metrics HTTP server on
``metrics_port + 10 * replica`` (``metrics_port: 0``: off). A metrics port that is taken is logged as an error
and does not stop the stage."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from stageserve.serving.common import metrics, tracing
from stageserve.serving.common.config import REPLICA_PORT_STRIDE, StageServeConfig
from stageserve.serving.kv_formats import WIRE_FORMATS

log = logging.getLogger("stageserve")

STAGE_METRICS = {
    "gateway": ("gateway",),
    "throttler": ("throttler",),
    "encoder": ("encoder",),
    "prefill": ("engine", "kv_transfer"),
    "decode": ("engine", "kv_transfer"),
}


def metrics_port(config: StageServeConfig, stage: str, replica: int) -> int | None:
    """Where a replica serves Prometheus metrics (None for the gateway: its HTTP port's ``/metrics``)."""
    if stage == "gateway":
        return None
    return int(getattr(config, stage).metrics_port) + REPLICA_PORT_STRIDE * replica


def start(
    config: StageServeConfig, stage: str, replica: int = 0, model_name: str = "", load: Callable[[], Any] | None = None
) -> None:
    """``load`` (prefill, decode): returns the engine's current load (num_waiting, num_running, kv_cache_usage)."""
    tracing.setup(stage, replica)
    metrics.enable(*STAGE_METRICS[stage])
    metrics.set_stage_info(stage, replica, model_name)
    if load is not None:
        metrics.bind_engine_load(model_name, load)
        metrics.init_kv_transfer(WIRE_FORMATS)
    if stage == "throttler":
        metrics.init_throttler()
    if stage == "encoder":
        metrics.init_encoder()
    port = metrics_port(config, stage, replica)
    if port is None:
        return
    if port == REPLICA_PORT_STRIDE * replica:  # metrics_port: 0 turns the endpoint off
        log.info("metrics endpoint off (%s.metrics_port: 0)", stage)
        return
    try:
        metrics.serve(port, config.host)
    except OSError as exc:  # the stage still serves; only its metrics are missing, and the log says why
        log.error("metrics NOT served: cannot listen on %s:%d (%s.metrics_port): %s", config.host, port, stage, exc)
        return
    log.info("metrics on http://%s:%d/metrics", config.host, port)


def watch_throttler(servicer: Any) -> None:
    """Exports the throttler servicer's state through its metric hooks (``overloaded``, ``service_gap_tokens()``,
    ``redis_degraded``, ``throttle.queued``) and counts its decisions (``decision_listeners``)."""
    listener = metrics.bind_throttler(
        lambda: servicer.overloaded,
        servicer.service_gap_tokens,
        lambda: len(servicer.throttle.queued),
        lambda: servicer.redis_degraded,
    )
    servicer.decision_listeners.append(listener)
