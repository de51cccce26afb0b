"""The kubernetes adapter's HTTP requests, captured by a small recording HTTP server (no API server here)."""

from __future__ import annotations

import pytest

from stageserve_operator.adapters.k8s import object_path, status_path
from stageserve_operator.reconcile import reconcile
from stageserve_operator.render import render
from stageserve_operator.spec import parse_spec

SPEC = parse_spec({"stages": {"decode": {"replicas": 2, "minReplicas": 1, "maxReplicas": 4}}})


def test_apply_is_one_server_side_apply_patch_per_object(recorder):
    kube, seen = recorder
    objs = render("demo", "ml", "uid-1", SPEC, reconcile(SPEC, {}, {}, 0.0).replicas)
    kube.apply_all(objs)
    assert len(seen) == len(objs) == 15
    paths = {r["path"] for r in seen}
    assert "/apis/apps/v1/namespaces/ml/deployments/demo-decode" in paths
    assert "/api/v1/namespaces/ml/services/demo-prefill" in paths
    assert "/api/v1/namespaces/ml/configmaps/demo-gateway-config" in paths
    for req, obj in zip(seen, objs, strict=True):
        assert req["method"] == "PATCH"
        assert req["content_type"] == "application/apply-patch+yaml"
        assert req["query"] == {"fieldManager": ["stageserve-operator"], "force": ["true"]}
        assert req["auth"] == "Bearer test-token"
        assert req["body"] == obj  # the rendered object, byte for byte as JSON
    decode = next(r["body"] for r in seen if r["path"].endswith("deployments/demo-decode"))
    assert decode["spec"]["replicas"] == 2


def test_status_patch_targets_the_status_subresource(recorder):
    kube, seen = recorder
    kube.patch_status("demo", "ml", {"summary": "encoder=1 prefill=1 decode=2"})
    path = "/apis/stageserve.io/v1alpha1/namespaces/ml/stageservedeployments/demo/status"
    assert seen == [{"method": "PATCH", "path": path,
                     "query": {}, "content_type": "application/merge-patch+json", "auth": "Bearer test-token",
                     "body": {"status": {"summary": "encoder=1 prefill=1 decode=2"}}}]


def test_gpu_nodes_skips_cpu_only_and_cordoned_nodes(recorder):
    kube, seen = recorder
    nodes = kube.gpu_nodes()
    assert [(n.name, n.gpus) for n in nodes] == [("gpu-a", 8)]
    assert seen[0]["method"] == "GET" and seen[0]["path"] == "/api/v1/nodes"


def test_paths_and_unknown_kinds():
    assert object_path({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
                        "metadata": {"name": "x", "namespace": "n"}}) == \
        "/apis/monitoring.coreos.com/v1/namespaces/n/podmonitors/x"
    assert status_path("a", "b") == "/apis/stageserve.io/v1alpha1/namespaces/b/stageservedeployments/a/status"
    with pytest.raises(ValueError, match="Secret"):
        object_path({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": "n"}})
