"""The operator's own metrics (prometheus_client): what it decided per stage, for dashboards and alerts.

``stageserve_replicas{deployment,stage}`` (running), ``stageserve_desired_replicas{deployment,stage}``
(ceil(load/capacity) before hysteresis), ``stageserve_stage_load_tokens_per_second{deployment,stage}`` and
``stageserve_slo_attainment{deployment,stage}`` (absent without traffic), all read from the status the
operator writes, so the metrics and ``kubectl get ssd -o yaml`` always agree.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

LABELS = ["deployment", "stage"]


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.replicas = Gauge("stageserve_replicas", "Replicas the operator runs", LABELS, registry=r)
        self.desired = Gauge("stageserve_desired_replicas", "ceil(load / capacity) before hysteresis", LABELS,
                             registry=r)
        self.load = Gauge("stageserve_stage_load_tokens_per_second", "Stage load the autoscaler saw", LABELS,
                          registry=r)
        self.attainment = Gauge("stageserve_slo_attainment", "Share of requests within the stage's SLO", LABELS,
                                registry=r)

    def record(self, deployment: str, status: dict[str, Any]) -> None:
        for stage, entry in (status.get("stages") or {}).items():
            self.replicas.labels(deployment, stage).set(entry.get("replicas", 0))
            self.desired.labels(deployment, stage).set(entry.get("desired", entry.get("replicas", 0)))
            load = entry.get("load") or {}
            if "tokensPerSecond" in load:
                self.load.labels(deployment, stage).set(load["tokensPerSecond"])
            if "sloAttainment" in load:
                self.attainment.labels(deployment, stage).set(load["sloAttainment"])
            else:
                try:
                    self.attainment.remove(deployment, stage)
                except KeyError:
                    pass

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
