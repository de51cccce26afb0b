"""kopf handlers: thin glue over ``parse_spec`` -> ``reconcile`` -> ``render`` and the two adapters.

create/update/resume apply the rendered objects at the current replicas; the timer re-plans from Prometheus
(the policy decides whether a re-plan is due: every ``replanIntervalSeconds`` or at once on an SLO breach);
delete needs nothing: every object has an owner reference, so Kubernetes' garbage collector removes them.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import kopf

from stageserve_operator.adapters.exporter import OperatorMetrics
from stageserve_operator.adapters.k8s import Kubernetes
from stageserve_operator.adapters.prometheus import Prometheus, PrometheusError
from stageserve_operator.reconcile import reconcile, render_status
from stageserve_operator.render import render
from stageserve_operator.spec import GROUP, PLURAL, SCALED_STAGES, VERSION, SpecError, parse_spec

TIMER_INTERVAL_S = 15.0
METRICS = OperatorMetrics()  # served by `stageserve operator` (--metrics-port, default 9108)


@functools.cache
def _kube() -> Kubernetes:
    return Kubernetes.from_environment()


def _sync(name: str, namespace: str, uid: str, spec: Any, status: Any, generation: int, patch: Any,
          with_metrics: bool, logger: Any) -> None:
    try:
        parsed = parse_spec(dict(spec))
    except SpecError as exc:
        raise kopf.PermanentError(str(exc)) from None
    loads = {}
    if with_metrics and parsed.autoscaling.enabled:
        prom = Prometheus(parsed.autoscaling.prometheus_url)
        try:
            loads = {s: prom.stage_load(s, parsed.autoscaling.metrics_window,
                                        parsed.itl_p99_s if s == "decode" else parsed.ttft_p99_s, name)
                     for s in SCALED_STAGES if parsed.stages[s].autoscaled}
        except PrometheusError as exc:
            logger.warning(f"metrics unavailable, keeping replicas: {exc}")
    now = time.time()
    result = reconcile(parsed, dict(status or {}), loads, now, _kube().gpu_nodes())
    _kube().apply_all(render(name, namespace, uid, parsed, result.replicas, result.placement))
    new_status = render_status(parsed, dict(status or {}), result, loads, now, generation)
    patch.status.update(new_status)
    METRICS.record(name, new_status)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def apply_spec(name, namespace, uid, spec, status, meta, patch, logger, **_):  # noqa: ANN001, ANN201
    _sync(name, namespace, uid, spec, status, meta.get("generation"), patch, False, logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=TIMER_INTERVAL_S, initial_delay=TIMER_INTERVAL_S)
def replan(name, namespace, uid, spec, status, meta, patch, logger, **_):  # noqa: ANN001, ANN201
    _sync(name, namespace, uid, spec, status, meta.get("generation"), patch, True, logger)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def deleted(name, logger, **_):  # noqa: ANN001, ANN201
    logger.info(f"{name} deleted; owned objects go with it (owner references)")
