"""The ``StageServeDeployment`` spec (``stageserve.io/v1alpha1``) as frozen dataclasses, parsed once.

Field names follow the CRD (camelCase in YAML); defaults here equal the CRD schema defaults, so a spec the
API server accepted parses the same way with or without defaulting. Errors name the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stageserve_operator.policy.autoscale import ScalePolicy

GROUP = "stageserve.io"
VERSION = "v1alpha1"
KIND = "StageServeDeployment"
PLURAL = "stageservedeployments"
STAGE_NAMES = ("gateway", "throttler", "encoder", "prefill", "decode")
SCALED_STAGES = ("encoder", "prefill", "decode")
GPU_STAGES = ("encoder", "prefill", "decode")
STAGE_PORTS = {"gateway": 50051, "throttler": 50052, "encoder": 50053, "prefill": 50054, "decode": 50055}
METRICS_PORTS = {"gateway": 8000, "throttler": 9102, "encoder": 9103, "prefill": 9104, "decode": 9105}
DEFAULT_CAPACITY = {"encoder": 20000.0, "prefill": 8000.0, "decode": 2000.0}


class SpecError(ValueError):
    """The custom resource's spec is invalid; the message names the field."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 1
    image: str = ""
    gpus: int = 0
    resources: dict[str, Any] = field(default_factory=dict)
    capacity_tokens_per_s: float = 0.0
    max_seqs_per_replica: int = 0

    @property
    def autoscaled(self) -> bool:
        return self.name in SCALED_STAGES and self.max_replicas > self.min_replicas


@dataclass(frozen=True)
class AutoscalingSpec:
    enabled: bool = True
    replan_interval_s: float = 300.0
    scale_down_window_s: float = 900.0
    cooldown_s: float = 60.0
    max_scale_down_fraction: float = 0.25
    slo_target: float = 0.99
    metrics_window: str = "2m"
    drain_s: float = 300.0
    settle_s: float = 240.0
    prometheus_url: str = "http://prometheus-operated.monitoring:9090"


@dataclass(frozen=True)
class TlsSpec:
    """mTLS between stages: a Secret with ``tls.crt``, ``tls.key`` and ``ca.crt`` mounted into every stage pod."""

    enabled: bool = False
    secret_name: str = ""
    server_name: str = ""  # the name every stage's certificate carries; empty: <deployment>.<namespace>.svc


@dataclass(frozen=True)
class DeploymentSpec:
    model: str
    kv_format: str
    model_kind: str  # decOnly | croAttn
    image: str
    stages: dict[str, StageSpec]
    ttft_p99_s: float = 2.0
    itl_p99_s: float = 0.1
    fairness: dict[str, Any] = field(default_factory=dict)
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)
    pod_monitors: bool = False
    redis_url: str = ""
    tls: TlsSpec = field(default_factory=TlsSpec)

    def scale_policy(self, stage: str) -> ScalePolicy:
        s, a = self.stages[stage], self.autoscaling
        return ScalePolicy(
            capacity_tokens_per_s=s.capacity_tokens_per_s or DEFAULT_CAPACITY[stage],
            min_replicas=s.min_replicas,
            max_replicas=s.max_replicas,
            replan_interval_s=a.replan_interval_s,
            scale_down_window_s=a.scale_down_window_s,
            cooldown_s=a.cooldown_s,
            max_scale_down_fraction=a.max_scale_down_fraction,
            slo_target=a.slo_target,
            drain_s=a.drain_s,
            settle_s=a.settle_s,
            max_seqs_per_replica=s.max_seqs_per_replica,
        )


def parse_spec(spec: dict[str, Any]) -> DeploymentSpec:
    """Parses ``.spec`` of a StageServeDeployment; raises SpecError naming the bad field."""
    if not isinstance(spec, dict):
        raise SpecError("spec: must be a mapping")
    stages_raw = _mapping(spec.get("stages", {}), "spec.stages")
    unknown = set(stages_raw) - set(STAGE_NAMES)
    if unknown:
        raise SpecError(f"spec.stages.{sorted(unknown)[0]}: unknown stage (stages: {', '.join(STAGE_NAMES)})")
    image = str(spec.get("image", "ghcr.io/stageserve/stageserve:0.1.0"))
    stages = {name: _stage(name, _mapping(stages_raw.get(name, {}), f"spec.stages.{name}"), image)
              for name in STAGE_NAMES}
    slo = _mapping(spec.get("slo", {}), "spec.slo")
    kv_format = str(spec.get("kvFormat", "auto"))
    model_kind = str(spec.get("modelKind", "decOnly"))
    if model_kind not in ("decOnly", "croAttn"):
        raise SpecError(f"spec.modelKind: must be decOnly or croAttn, got {model_kind!r}")
    monitoring = _mapping(spec.get("monitoring", {}), "spec.monitoring")
    return DeploymentSpec(
        model=str(spec.get("model", "")),
        kv_format=kv_format,
        model_kind=model_kind,
        image=image,
        stages=stages,
        ttft_p99_s=_positive(slo.get("ttftP99", 2.0), "spec.slo.ttftP99"),
        itl_p99_s=_positive(slo.get("itlP99", 0.1), "spec.slo.itlP99"),
        fairness=dict(_mapping(spec.get("fairness", {}), "spec.fairness")),
        autoscaling=_autoscaling(_mapping(spec.get("autoscaling", {}), "spec.autoscaling")),
        pod_monitors=bool(monitoring.get("podMonitors", False)),
        redis_url=str(spec.get("redisUrl", "")),
        tls=_tls(_mapping(spec.get("tls", {}), "spec.tls")),
    )


def _tls(raw: dict[str, Any]) -> TlsSpec:
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise SpecError(f"spec.tls.enabled: must be true or false, got {enabled!r}")
    secret = str(raw.get("secretName", ""))
    if enabled and not secret:
        raise SpecError("spec.tls.secretName: required when spec.tls.enabled (a Secret with tls.crt, tls.key, ca.crt)")
    return TlsSpec(enabled=enabled, secret_name=secret, server_name=str(raw.get("serverName", "")))


def _stage(name: str, raw: dict[str, Any], image: str) -> StageSpec:
    where = f"spec.stages.{name}"
    replicas = _int(raw.get("replicas", 1), f"{where}.replicas", 0)
    lo = _int(raw.get("minReplicas", replicas if name in SCALED_STAGES else 1), f"{where}.minReplicas", 0)
    hi = _int(raw.get("maxReplicas", max(lo, replicas)), f"{where}.maxReplicas", 0)
    if lo > hi:
        raise SpecError(f"{where}.minReplicas: {lo} exceeds maxReplicas {hi}")
    if name not in SCALED_STAGES and (replicas != 1 or hi != 1):
        raise SpecError(f"{where}.replicas: {name} runs exactly one replica")
    capacity = raw.get("capacityTokensPerSecond", 0.0)
    if not isinstance(capacity, int | float) or capacity < 0:
        raise SpecError(f"{where}.capacityTokensPerSecond: must be a number >= 0, got {capacity!r}")
    return StageSpec(
        name=name,
        replicas=min(max(replicas, lo), hi),
        min_replicas=lo,
        max_replicas=hi,
        image=str(raw.get("image", image)),
        gpus=_int(raw.get("gpus", 1 if name in GPU_STAGES else 0), f"{where}.gpus", 0),
        resources=dict(_mapping(raw.get("resources", {}), f"{where}.resources")),
        capacity_tokens_per_s=float(capacity),
        max_seqs_per_replica=_int(raw.get("maxSeqsPerReplica", 0), f"{where}.maxSeqsPerReplica", 0),
    )


def _autoscaling(raw: dict[str, Any]) -> AutoscalingSpec:
    d = AutoscalingSpec()
    return AutoscalingSpec(
        enabled=bool(raw.get("enabled", d.enabled)),
        replan_interval_s=_positive(raw.get("replanIntervalSeconds", d.replan_interval_s),
                                    "spec.autoscaling.replanIntervalSeconds"),
        scale_down_window_s=_nonneg(raw.get("scaleDownWindowSeconds", d.scale_down_window_s),
                                    "spec.autoscaling.scaleDownWindowSeconds"),
        cooldown_s=_nonneg(raw.get("cooldownSeconds", d.cooldown_s), "spec.autoscaling.cooldownSeconds"),
        max_scale_down_fraction=_positive(raw.get("maxScaleDownFraction", d.max_scale_down_fraction),
                                          "spec.autoscaling.maxScaleDownFraction"),
        slo_target=_positive(raw.get("sloTarget", d.slo_target), "spec.autoscaling.sloTarget"),
        metrics_window=str(raw.get("metricsWindow", d.metrics_window)),
        drain_s=_positive(raw.get("drainSeconds", d.drain_s), "spec.autoscaling.drainSeconds"),
        settle_s=_nonneg(raw.get("settleSeconds", d.settle_s), "spec.autoscaling.settleSeconds"),
        prometheus_url=str(raw.get("prometheusUrl", d.prometheus_url)),
    )


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: must be a mapping, got {type(value).__name__}")
    return value


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{where}: must be an integer >= {minimum}, got {value!r}")
    return value


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise SpecError(f"{where}: must be a number > 0, got {value!r}")
    return float(value)


def _nonneg(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise SpecError(f"{where}: must be a number >= 0, got {value!r}")
    return float(value)
