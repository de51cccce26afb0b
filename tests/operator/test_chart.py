"""The Helm charts rendered by Helm itself (helm-python-sdk: Helm v4's Go SDK), every manifest validated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from stageserve_operator.spec import parse_spec

from .manifests import CRD_FILE, ROOT, crd, validate_resource

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the Helm Go SDK) not installed")

CHART = ROOT / "deploy" / "helm" / "stageserve"
CRDS = ROOT / "deploy" / "helm" / "stageserve-crds"
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


def render(chart: Path, values: dict, name: str = "demo", namespace: str = "ml") -> list[dict]:
    with helm.Chart.load(str(chart)) as c:
        c.validate_schema(values)
        out = c.render(values, name=name, namespace=namespace)
    docs = []
    for text in out.values():
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.mark.parametrize("values_file", VALUES, ids=[p.stem for p in VALUES])
def test_every_manifest_is_valid_for_kubernetes_1_30_and_the_crd(values_file):
    values = yaml.safe_load(values_file.read_text()) or {}
    docs = render(CHART, values)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("StageServeDeployment") == 1
    for doc in docs:
        validate_resource(doc)  # kubernetes-validate strict (built-ins), jsonschema against the CRD (the CR)
    ssd = next(d for d in docs if d["kind"] == "StageServeDeployment")
    spec = parse_spec(ssd["spec"])  # the operator accepts what the chart renders
    assert ssd["metadata"] == {**ssd["metadata"], "name": "demo", "namespace": "ml"}
    for stage, section in values.get("stages", {}).items():
        for key in ("replicas", "minReplicas", "maxReplicas", "capacityTokensPerSecond"):
            if key in section:
                assert ssd["spec"]["stages"][stage][key] == section[key]
    assert spec.stages["prefill"].image == ssd["spec"]["image"]


def test_gpu_cluster_values_turn_on_redis_servicemonitor_and_cluster_wide_rbac():
    docs = render(CHART, yaml.safe_load((CHART / "ci" / "gpu-cluster-values.yaml").read_text()))
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    assert {d["metadata"]["name"] for d in by_kind["Deployment"]} == {"demo-operator", "demo-redis"}
    sm = by_kind["ServiceMonitor"][0]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert {r["targetLabel"] for r in sm["spec"]["endpoints"][0]["relabelings"]} == {"stage", "deployment"}
    assert [d["metadata"]["name"] for d in by_kind["PodMonitor"]] == ["demo-operator"]  # the operator's own
    ssd = by_kind["StageServeDeployment"][0]["spec"]
    assert ssd["redisUrl"] == "redis://demo-redis:6379/0" and ssd["monitoring"] == {"podMonitors": False}
    assert ssd["image"] == "registry.example.com/ml/stageserve:0.1.0-cuda"
    op = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "demo-operator")
    assert "--namespace" not in op["spec"]["template"]["spec"]["containers"][0]["command"]
    rules = by_kind["ClusterRole"][0]["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    for need in (("stageserve.io", "stageservedeployments/status"), ("apps", "deployments"), ("", "services"),
                 ("", "configmaps"), ("monitoring.coreos.com", "podmonitors"), ("", "nodes")):
        assert need in granted


def test_default_values_use_podmonitors_through_the_operator_and_watch_the_release_namespace():
    docs = render(CHART, {})
    ssd = next(d for d in docs if d["kind"] == "StageServeDeployment")
    assert ssd["spec"]["monitoring"] == {"podMonitors": True}
    # stage PodMonitors come from the operator; the chart monitors only the operator itself
    assert [(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")] == \
        [("PodMonitor", "demo-operator")]
    op = next(d for d in docs if d["kind"] == "Deployment")
    cmd = op["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["stageserve", "operator"] and cmd[-2:] == ["--namespace", "ml"]
    assert cmd[cmd.index("--metrics-port") + 1] == "9108"


@pytest.mark.parametrize("bad,where", [
    ({"stages": {"prefill": {"replicas": -1}}}, "replicas"),
    ({"monitoring": {"kind": "Both"}}, "kind"),
    ({"autoscaling": {"metricsWindow": "two minutes"}}, "metricsWindow"),
    ({"kvFormat": "int3"}, "kvFormat"),
    ({"stages": {"decode": {"gpu": 1}}}, "gpu"),
])
def test_values_schema_rejects_bad_values(bad, where):
    with helm.Chart.load(str(CHART)) as c, pytest.raises(helm.HelmError, match=where):
        c.render(bad, name="demo", namespace="ml")


def test_dashboards_become_configmaps_with_the_grafana_sidecar_label(tmp_path):
    chart = tmp_path / "stageserve"
    shutil.copytree(CHART, chart, symlinks=False, ignore=shutil.ignore_patterns("dashboards"))
    (chart / "dashboards").mkdir()
    panel = {"title": "stageserve autoscaling", "panels": [{"type": "timeseries", "title": "replicas"}]}
    (chart / "dashboards" / "stageserve_autoscaling.json").write_text(json.dumps(panel))
    docs = render(chart, {"dashboards": {"folder": "LLM"}})
    cms = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(cms) == 1
    cm = cms[0]
    assert cm["metadata"]["name"] == "demo-dashboard-stageserve-autoscaling"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "LLM"
    assert json.loads(cm["data"]["stageserve_autoscaling.json"]) == panel
    assert not [d for d in render(chart, {"dashboards": {"enabled": False}}) if d["kind"] == "ConfigMap"]


def test_the_repository_dashboards_are_all_packaged():
    shipped = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
    docs = render(CHART, {})
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    assert len(cms) == len(shipped)
    for path in shipped:
        assert any(path.name in cm["data"] for cm in cms.values())


def test_crd_chart_renders_the_crd_unchanged_and_kept_on_uninstall():
    docs = render(CRDS, {})
    assert docs == [crd()]
    assert docs[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert CRD_FILE.exists()


def test_helm_lint_is_clean():
    for chart in (CHART, CRDS):
        findings = helm.lint(str(chart))
        assert findings["errors"] == [], findings
        # severity 1 = INFO (e.g. "icon is recommended"); 2 = WARNING, 4 = ERROR
        assert all(m["severity"] <= 1 for m in findings["messages"]), findings


def _operator_objects(values: dict) -> tuple[dict, list[dict]]:
    """values -> the chart's StageServeDeployment -> the objects the operator renders from it (all validated)."""
    from stageserve_operator.render import render as operator_render

    ssd = next(d for d in render(CHART, values) if d["kind"] == "StageServeDeployment")
    validate_resource(ssd)
    spec = parse_spec(ssd["spec"])
    objs = operator_render("demo", "ml", "uid-1", spec, {s: st.replicas for s, st in spec.stages.items()})
    for o in objs:
        validate_resource(o)
    return ssd, objs


def _stage_pods(objs: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Deployment"}


def _stage_configs(objs: list[dict]):
    from stageserve.serving.common.config import load_config

    for o in objs:
        if o["kind"] == "ConfigMap":
            yield o["metadata"]["name"], yaml.safe_load(o["data"]["stageserve.yaml"]), load_config


def test_tls_values_mount_the_secret_into_every_stage_pod_and_set_the_serving_tls(tmp_path):
    ssd, objs = _operator_objects({"tls": {"enabled": True, "secretName": "stageserve-mtls"}})
    assert ssd["spec"]["tls"] == {"enabled": True, "secretName": "stageserve-mtls"}
    pods = _stage_pods(objs)
    assert len(pods) == 5
    for name, pod in pods.items():
        assert {"name": "tls", "secret": {"secretName": "stageserve-mtls"}} in pod["volumes"], name
        container = pod["containers"][0]
        assert {"name": "tls", "mountPath": "/etc/stageserve/tls", "readOnly": True} in container["volumeMounts"]
        probe = container["readinessProbe"]["exec"]["command"]  # kubelet's grpc probe cannot do mTLS
        assert probe[:3] == ["python", "-m", "stageserve.serving.common.probe"] and "grpc" not in container[
            "readinessProbe"]
    configs = list(_stage_configs(objs))
    assert len(configs) == 5
    for name, doc, load_config in configs:
        assert doc["tls"] == {"enabled": True, "cert_file": "/etc/stageserve/tls/tls.crt",
                              "key_file": "/etc/stageserve/tls/tls.key", "ca_file": "/etc/stageserve/tls/ca.crt",
                              "server_name": "demo.ml.svc"}, name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        tls = load_config(str(path)).tls  # the stage accepts the rendered section
        assert tls.enabled and tls.cert_file.endswith("tls.crt") and tls.server_name == "demo.ml.svc"
    _, objs = _operator_objects({"tls": {"enabled": True, "secretName": "s", "serverName": "stages.internal"}})
    assert {doc["tls"]["server_name"] for _, doc, _ in _stage_configs(objs)} == {"stages.internal"}


def test_tls_off_by_default_renders_no_secret_and_grpc_probes():
    ssd, objs = _operator_objects({})
    assert "tls" not in ssd["spec"]
    for name, pod in _stage_pods(objs).items():
        assert [v["name"] for v in pod["volumes"]] == ["config"], name
        assert "grpc" in pod["containers"][0]["readinessProbe"]
    assert all("tls" not in doc for _, doc, _ in _stage_configs(objs))


def test_tls_enabled_without_a_secret_is_rejected_by_the_schema():
    with helm.Chart.load(str(CHART)) as c, pytest.raises(helm.HelmError, match="secretName"):
        c.render({"tls": {"enabled": True}}, name="demo", namespace="ml")
