"""Pure rendering: a StageServeDeployment plus its planned replicas and placement -> Kubernetes objects.

Per stage: a ConfigMap (the stage's ``stageserve.yaml``), a headless Service (gRPC + metrics ports), a
Deployment (grpc health probes, GPU requests, placement affinity) and, when ``spec.monitoring.podMonitors``
is on, a PodMonitor whose relabeling adds the ``stage`` and ``deployment`` labels the autoscaler queries.
Every object carries an owner reference to the custom resource, so deleting it deletes them.
"""

from __future__ import annotations

from typing import Any

import yaml

from stageserve_operator.policy.placement import Placement, node_affinity
from stageserve_operator.spec import (
    GROUP,
    KIND,
    METRICS_PORTS,
    STAGE_NAMES,
    STAGE_PORTS,
    VERSION,
    DeploymentSpec,
)

CONFIG_PATH = "/etc/stageserve/stageserve.yaml"
TLS_DIR = "/etc/stageserve/tls"  # the spec.tls Secret (tls.crt, tls.key, ca.crt) in every stage pod
STAGE_LABEL = "stageserve.io/stage"
DEPLOYMENT_LABEL = "stageserve.io/deployment"
DISCOVERED_STAGES = ("throttler", "encoder", "prefill", "decode")  # the gateway resolves these by DNS


def labels(name: str, stage: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "stageserve",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": stage,
        "app.kubernetes.io/part-of": "stageserve",
        "app.kubernetes.io/managed-by": "stageserve-operator",
        DEPLOYMENT_LABEL: name,
        STAGE_LABEL: stage,
    }


def selector(name: str, stage: str) -> dict[str, str]:
    return {DEPLOYMENT_LABEL: name, STAGE_LABEL: stage}


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def service_dns(name: str, namespace: str, stage: str) -> str:
    """The DNS name of a stage's Service (headless for the discovered stages: it resolves to the ready pods)."""
    return f"{name}-{stage}.{namespace}.svc"


def stage_config(spec: DeploymentSpec, stage: str, name: str = "", namespace: str = "") -> str:
    """The ``stageserve.yaml`` a pod of ``stage`` reads (serving config format, bound on all interfaces). With
    ``name``/``namespace``, every stage behind the gateway is found by DNS (``discovery: dns`` of its headless
    Service, re-resolved by the gateway), since each stage runs in its own pods."""
    doc: dict[str, Any] = {"model": spec.model or None, "host": "0.0.0.0", "kv_format": spec.kv_format}
    if name:
        for peer in DISCOVERED_STAGES:
            doc[peer] = {"port": STAGE_PORTS[peer], "discovery": "dns", "service": service_dns(name, namespace, peer)}
    if stage == "throttler" and spec.fairness.get("policy"):
        doc.setdefault("throttler", {})["policy"] = spec.fairness["policy"]
    if spec.tls.enabled:
        doc["tls"] = tls_section(spec, name, namespace)
    return yaml.safe_dump(doc, sort_keys=False)


def tls_section(spec: DeploymentSpec, name: str, namespace: str) -> dict[str, Any]:
    """The serving config's ``tls``: the mounted Secret's files; peers are checked against one shared name."""
    server_name = spec.tls.server_name or (f"{name}.{namespace}.svc" if name else "")
    return {"enabled": True, "cert_file": f"{TLS_DIR}/tls.crt", "key_file": f"{TLS_DIR}/tls.key",
            "ca_file": f"{TLS_DIR}/ca.crt", "server_name": server_name}


def render(
    name: str,
    namespace: str,
    uid: str,
    spec: DeploymentSpec,
    replicas: dict[str, int],
    placement: Placement | None = None,
) -> list[dict[str, Any]]:
    """Every object of the deployment, in apply order (config, services, deployments, monitors)."""
    owner = [owner_reference(name, uid)]
    objs: list[dict[str, Any]] = []
    for stage in STAGE_NAMES:
        objs.append(_config_map(name, namespace, stage, spec, owner))
    for stage in STAGE_NAMES:
        objs.append(_service(name, namespace, stage, owner))
    for stage in STAGE_NAMES:
        objs.append(_deployment(name, namespace, stage, spec, replicas[stage], placement, owner))
    if spec.pod_monitors:
        for stage in STAGE_NAMES:
            objs.append(_pod_monitor(name, namespace, stage, owner))
    return objs


def _meta(name: str, namespace: str, stage: str, owner: list[dict[str, Any]], suffix: str = "") -> dict[str, Any]:
    return {"name": f"{name}-{stage}{suffix}", "namespace": namespace, "labels": labels(name, stage),
            "ownerReferences": owner}


def _config_map(name: str, ns: str, stage: str, spec: DeploymentSpec, owner: list) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, ns, stage, owner, "-config"),
            "data": {"stageserve.yaml": stage_config(spec, stage, name, ns)}}


def _ports(stage: str) -> list[dict[str, Any]]:
    ports = [{"name": "grpc", "port": STAGE_PORTS[stage], "protocol": "TCP"}]
    if stage == "gateway":
        ports.append({"name": "http", "port": METRICS_PORTS[stage], "protocol": "TCP"})
    else:
        ports.append({"name": "metrics", "port": METRICS_PORTS[stage], "protocol": "TCP"})
    return ports


def _service(name: str, ns: str, stage: str, owner: list) -> dict[str, Any]:
    ports = [{**p, "targetPort": p["name"]} for p in _ports(stage)]
    spec: dict[str, Any] = {"selector": selector(name, stage), "ports": ports}
    if stage in DISCOVERED_STAGES:
        spec["clusterIP"] = "None"  # headless: the name resolves to every ready pod (the gateway's discovery)
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, ns, stage, owner), "spec": spec}


def _resources(spec: DeploymentSpec, stage: str) -> dict[str, Any]:
    s = spec.stages[stage]
    res = {k: dict(v) for k, v in s.resources.items() if k in ("requests", "limits")}
    if s.gpus > 0:
        res.setdefault("limits", {})["nvidia.com/gpu"] = s.gpus
        res.setdefault("requests", {})["nvidia.com/gpu"] = s.gpus
    return res


def _affinity(name: str, stage: str, placement: Placement | None) -> dict[str, Any]:
    affinity: dict[str, Any] = {}
    if placement is not None and stage in placement.assignments:
        affinity.update(node_affinity(placement.nodes_of(stage)))
    if stage == "prefill":  # KV pages stay on the node when prefill sits next to decode
        term = {"labelSelector": {"matchLabels": selector(name, "decode")}, "topologyKey": "kubernetes.io/hostname"}
        affinity["podAffinity"] = {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": term}]}
    return affinity


def _deployment(name: str, ns: str, stage: str, spec: DeploymentSpec, replicas: int,
                placement: Placement | None, owner: list) -> dict[str, Any]:
    grpc_port = STAGE_PORTS[stage]
    check: dict[str, Any] = {"grpc": {"port": grpc_port}}
    if spec.tls.enabled:  # kubelet's grpc probe cannot present a client certificate
        command = ["python", "-m", "stageserve.serving.common.probe", "--config", CONFIG_PATH, "--port", str(grpc_port)]
        check = {"exec": {"command": command}, "timeoutSeconds": 5}
    probe = {**check, "periodSeconds": 10, "failureThreshold": 3}
    container: dict[str, Any] = {
        "name": stage,
        "image": spec.stages[stage].image,
        "command": ["python", "-m", f"stageserve.serving.{stage}", "--config", CONFIG_PATH, "--replica", "0"],
        "ports": [{"name": p["name"], "containerPort": p["port"], "protocol": "TCP"} for p in _ports(stage)],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "initialDelaySeconds": 30},
        "startupProbe": {**probe, "failureThreshold": 60},
        "resources": _resources(spec, stage),
        "volumeMounts": [{"name": "config", "mountPath": "/etc/stageserve", "readOnly": True}],
    }
    if spec.redis_url and stage == "throttler":
        container["env"] = [{"name": "STAGESERVE_REDIS_URL", "value": spec.redis_url}]
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": f"{name}-{stage}-config"}}],
    }
    if spec.tls.enabled:
        container["volumeMounts"].append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        pod["volumes"].append({"name": "tls", "secret": {"secretName": spec.tls.secret_name}})
    affinity = _affinity(name, stage, placement)
    if affinity:
        pod["affinity"] = affinity
    if spec.stages[stage].gpus > 0:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, ns, stage, owner),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(name, stage)},
            "template": {"metadata": {"labels": labels(name, stage)}, "spec": pod},
        },
    }


def _pod_monitor(name: str, ns: str, stage: str, owner: list) -> dict[str, Any]:
    port = "http" if stage == "gateway" else "metrics"
    relabel = [
        {"sourceLabels": ["__meta_kubernetes_pod_label_stageserve_io_stage"], "targetLabel": "stage"},
        {"sourceLabels": ["__meta_kubernetes_pod_label_stageserve_io_deployment"], "targetLabel": "deployment"},
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(name, ns, stage, owner),
        "spec": {
            "selector": {"matchLabels": selector(name, stage)},
            "podMetricsEndpoints": [{"port": port, "path": "/metrics", "interval": "15s", "relabelings": relabel}],
        },
    }
