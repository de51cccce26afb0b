"""Spec parsing, pure reconcile and render: the objects the operator writes, without an API server."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml

from stageserve_operator.policy.autoscale import StageLoad
from stageserve_operator.policy.placement import Node
from stageserve_operator.reconcile import current_replicas, reconcile, render_status
from stageserve_operator.render import render
from stageserve_operator.spec import SpecError, parse_spec

from .manifests import crd, crd_schema, validate_resource

SPEC = {
    "model": "/models/internvl.gguf",
    "kvFormat": "hack2",
    "fairness": {"policy": "fairserve"},
    "slo": {"ttftP99": 2.0, "itlP99": 0.1},
    "autoscaling": {"replanIntervalSeconds": 300, "scaleDownWindowSeconds": 900, "cooldownSeconds": 60},
    "monitoring": {"podMonitors": True},
    "stages": {
        "encoder": {"replicas": 1, "minReplicas": 1, "maxReplicas": 8, "gpus": 1, "capacityTokensPerSecond": 1000},
        "prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 8, "gpus": 2, "capacityTokensPerSecond": 2000,
                    "resources": {"requests": {"cpu": "4", "memory": "32Gi"}}},
        "decode": {"replicas": 2, "minReplicas": 1, "maxReplicas": 8, "gpus": 2, "capacityTokensPerSecond": 200,
                   "maxSeqsPerReplica": 64},
    },
}
CR = {"apiVersion": "stageserve.io/v1alpha1", "kind": "StageServeDeployment",
      "metadata": {"name": "demo", "namespace": "ml"}, "spec": SPEC}


def test_example_resource_validates_against_the_crd_and_parses():
    jsonschema.validate(CR, crd_schema())
    spec = parse_spec(SPEC)
    assert spec.stages["decode"].replicas == 2 and spec.stages["decode"].max_seqs_per_replica == 64
    assert spec.stages["gateway"].replicas == 1 and not spec.stages["gateway"].autoscaled
    assert spec.scale_policy("prefill").capacity_tokens_per_s == 2000


@pytest.mark.parametrize("path,value,field", [
    (("stages", "prefill", "minReplicas"), 9, "spec.stages.prefill.minReplicas"),
    (("stages", "gateway", "replicas"), 2, "spec.stages.gateway.replicas"),
    (("stages", "decode", "replicas"), -1, "spec.stages.decode.replicas"),
    (("slo", "ttftP99"), 0, "spec.slo.ttftP99"),
    (("modelKind",), "mixed", "spec.modelKind"),
])
def test_bad_specs_name_the_field_and_the_crd_rejects_them_too(path, value, field):
    spec = yaml.safe_load(yaml.safe_dump(SPEC))
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(spec)
    if path != ("stages", "prefill", "minReplicas"):  # min <= max is a CEL rule, checked by the API server
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**CR, "spec": spec}, crd_schema())


def test_crd_has_status_subresource_printer_columns_and_validation_rule():
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:3] == ["Encoder", "Prefill", "Decode"]
    enc = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["stages"]["properties"]["encoder"]
    assert "minReplicas <= self.maxReplicas" in enc["x-kubernetes-validations"][0]["rule"]
    kubernetes_validate.validate(crd(), "1.30.0", strict=True)


def objects(status=None, loads=None, nodes=None, now=1000.0):
    spec = parse_spec(SPEC)
    result = reconcile(spec, status or {}, loads or {}, now, nodes)
    return spec, result, render("demo", "ml", "uid-123", spec, result.replicas, result.placement)


def test_render_per_stage_objects_with_owner_references_and_valid_schemas():
    _, _, objs = objects(nodes=[Node("gpu-a", 8), Node("gpu-b", 8)])
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objs]
    for stage in ("gateway", "throttler", "encoder", "prefill", "decode"):
        for kind, suffix in (("ConfigMap", "-config"), ("Service", ""), ("Deployment", ""), ("PodMonitor", "")):
            assert (kind, f"demo-{stage}{suffix}") in kinds
    for o in objs:
        ref = o["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("StageServeDeployment", "demo",
                                                                             "uid-123", True)
        validate_resource(o)


def test_render_deployments_carry_replicas_gpus_probes_and_placement():
    _, result, objs = objects(nodes=[Node("gpu-a", 8), Node("gpu-b", 8)])
    dep = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    decode = dep["demo-decode"]["spec"]
    assert decode["replicas"] == 2
    c = decode["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["readinessProbe"]["grpc"] == {"port": 50055}
    assert c["command"][:3] == ["python", "-m", "stageserve.serving.decode"]
    terms = decode["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["gpu-a", "gpu-b"]
    prefill = dep["demo-prefill"]["spec"]["template"]["spec"]["affinity"]
    peer = prefill["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert peer["labelSelector"]["matchLabels"] == {"stageserve.io/deployment": "demo", "stageserve.io/stage": "decode"}
    gw = dep["demo-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in gw["resources"].get("limits", {})
    cm = next(o for o in objs if o["metadata"]["name"] == "demo-throttler-config")
    assert yaml.safe_load(cm["data"]["stageserve.yaml"]) == {
        "model": "/models/internvl.gguf", "host": "0.0.0.0", "kv_format": "hack2",
        "throttler": {"port": 50052, "discovery": "dns", "service": "demo-throttler.ml.svc", "policy": "fairserve"},
        "encoder": {"port": 50053, "discovery": "dns", "service": "demo-encoder.ml.svc"},
        "prefill": {"port": 50054, "discovery": "dns", "service": "demo-prefill.ml.svc"},
        "decode": {"port": 50055, "discovery": "dns", "service": "demo-decode.ml.svc"},
    }
    pm = next(o for o in objs if o["kind"] == "PodMonitor" and o["metadata"]["name"] == "demo-prefill")
    labels = {r["targetLabel"] for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    assert labels == {"stage", "deployment"}
    assert result.placement is not None and not result.placement.unplaced


def test_reconcile_scales_from_load_and_status_round_trips_the_autoscaler_memory():
    spec = parse_spec(SPEC)
    loads = {"encoder": StageLoad(4500), "prefill": StageLoad(5000), "decode": StageLoad(300)}
    r1 = reconcile(spec, {}, loads, 1000.0)
    assert (r1.replicas["encoder"], r1.replicas["prefill"], r1.replicas["decode"]) == (5, 3, 2)
    status = render_status(spec, {}, r1, loads, 1000.0, generation=3)
    jsonschema.validate({**CR, "status": status}, crd_schema())
    assert status["stages"]["encoder"]["load"]["tokensPerSecond"] == 4500
    assert status["stages"]["encoder"]["reason"].startswith("scale up to 5")
    assert status["observedGeneration"] == 3 and status["summary"] == "encoder=5 prefill=3 decode=2"
    assert current_replicas(spec, status)["encoder"] == 5  # a restarted operator resumes from status
    # 60 s later load drops: not a re-plan tick yet, status keeps 5
    low = {"encoder": StageLoad(100), "prefill": StageLoad(100), "decode": StageLoad(10)}
    r2 = reconcile(spec, status, low, 1060.0)
    assert r2.replicas["encoder"] == 5 and "next re-plan" in r2.decisions["encoder"].reason


def test_reconcile_reports_unplaceable_replicas_in_status():
    spec = parse_spec(SPEC)
    loads = {"encoder": StageLoad(8000), "prefill": StageLoad(100), "decode": StageLoad(10)}
    r = reconcile(spec, {}, loads, 0.0, [Node("small", 4)])
    status = render_status(spec, {}, r, loads, 0.0)
    # decode keeps 2 replicas x 2 GPUs (stabilising), which fill the node: prefill and all 8 encoders wait
    assert status["placement"]["nodes"] == {"decode": {"small": 2}, "prefill": {}, "encoder": {}}
    assert status["placement"]["unplaced"] == {"prefill": 1, "encoder": 8}
    assert sum(status["placement"]["freeGpus"].values()) == 0


def test_tls_spec_needs_a_secret_when_enabled():
    assert not parse_spec(SPEC).tls.enabled
    with pytest.raises(SpecError, match="spec.tls.secretName"):
        parse_spec({**SPEC, "tls": {"enabled": True}})
    with pytest.raises(SpecError, match="spec.tls.enabled"):
        parse_spec({**SPEC, "tls": {"enabled": "yes"}})
    tls = parse_spec({**SPEC, "tls": {"enabled": True, "secretName": "mtls"}}).tls
    assert (tls.enabled, tls.secret_name, tls.server_name) == (True, "mtls", "")
