"""The kubernetes client seam: server-side apply of rendered objects, status patches, GPU node listing.

Every write is one HTTP request built here from a rendered object: ``PATCH`` with
``application/apply-patch+yaml`` (server-side apply, field manager ``stageserve-operator``, ``force=true``)
to the object's own path, so create and update are the same call and the operator never reads before it
writes. The status goes through the ``/status`` subresource as a JSON merge patch.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client as k8s

from stageserve_operator.policy.placement import Node
from stageserve_operator.spec import GROUP, PLURAL, VERSION

FIELD_MANAGER = "stageserve-operator"
GPU_RESOURCE = "nvidia.com/gpu"
_PLURALS = {"ConfigMap": "configmaps", "Service": "services", "Deployment": "deployments",
            "PodMonitor": "podmonitors", "ServiceMonitor": "servicemonitors", PLURAL: PLURAL,
            "StageServeDeployment": PLURAL}


def object_path(obj: dict[str, Any]) -> str:
    """The REST path of a namespaced object (core group under /api, others under /apis)."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    meta = obj["metadata"]
    plural = _PLURALS.get(kind)
    if plural is None:
        raise ValueError(f"kind: the operator does not manage {kind!r}")
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{meta['namespace']}/{plural}/{meta['name']}"


def status_path(name: str, namespace: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"


class Kubernetes:
    """Writes through one ``kubernetes.client.ApiClient`` (in-cluster or kubeconfig configuration)."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.api = api_client

    @classmethod
    def from_environment(cls) -> Kubernetes:
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(k8s.ApiClient())

    def _call(self, method: str, path: str, body: Any, content_type: str, query: list | None = None) -> Any:
        """One request through the client's serializer, auth and TLS settings; returns the decoded JSON."""
        _method, url, headers, payload, post = self.api.param_serialize(
            method, path, query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"],
        )
        reply = self.api.call_api(_method, url, header_params=headers, body=payload, post_params=post)
        reply.read()
        if not 200 <= reply.status < 300:
            raise k8s.ApiException(http_resp=reply)
        return json.loads(reply.data or b"null")

    def apply(self, obj: dict[str, Any]) -> Any:
        """Server-side apply of one object (creates it or updates the fields this operator owns)."""
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return self._call("PATCH", object_path(obj), obj, "application/apply-patch+yaml", query)

    def apply_all(self, objs: list[dict[str, Any]]) -> None:
        for obj in objs:
            self.apply(obj)

    def patch_status(self, name: str, namespace: str, status: dict[str, Any]) -> Any:
        return self._call("PATCH", status_path(name, namespace), {"status": status}, "application/merge-patch+json")

    def gpu_nodes(self) -> list[Node]:
        """Schedulable nodes with allocatable GPUs."""
        nodes = k8s.CoreV1Api(self.api).list_node().items
        out = []
        for n in nodes:
            if n.spec is not None and n.spec.unschedulable:
                continue
            gpus = int((n.status.allocatable or {}).get(GPU_RESOURCE, "0"))
            if gpus > 0:
                out.append(Node(n.metadata.name, gpus))
        return out
