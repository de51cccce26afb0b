"""The kubernetes adapter's HTTP requests, captured by a small recording HTTP server (no API server here)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client as k8s

from stageserve_operator.adapters.k8s import Kubernetes, object_path, status_path
from stageserve_operator.reconcile import reconcile
from stageserve_operator.render import render
from stageserve_operator.spec import parse_spec

NODES = {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": [
    {"metadata": {"name": "gpu-a"}, "spec": {}, "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "96"}}},
    {"metadata": {"name": "cpu-only"}, "spec": {}, "status": {"allocatable": {"cpu": "8"}}},
    {"metadata": {"name": "gpu-cordoned"}, "spec": {"unschedulable": True},
     "status": {"allocatable": {"nvidia.com/gpu": "8"}}},
]}


@pytest.fixture
def recorder():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            url = urlparse(self.path)
            seen.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                         "content_type": self.headers.get("Content-Type"), "auth": self.headers.get("Authorization"),
                         "body": json.loads(body) if body else None})
            reply = json.dumps(NODES if url.path == "/api/v1/nodes" else {"ok": True}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_PATCH = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cfg = k8s.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    cfg.api_key = {"BearerToken": "test-token"}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    cfg.proxy = None
    yield Kubernetes(k8s.ApiClient(cfg)), seen
    server.shutdown()


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
