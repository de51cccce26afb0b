"""Shared checks for rendered manifests: kubernetes-validate (strict, Kubernetes 1.30) and the CRD schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.30.0"
ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "deploy" / "helm" / "stageserve-crds" / "templates" / "stageservedeployment.yaml"
CUSTOM_KINDS = {"PodMonitor", "ServiceMonitor", "StageServeDeployment"}


def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())


def crd_schema() -> dict[str, Any]:
    """The CRD's OpenAPI v3 schema as JSON Schema (the structural subset jsonschema understands)."""
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return _to_jsonschema(schema)


def _to_jsonschema(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
        if out.get("exclusiveMinimum") is True:  # OpenAPI v3.0 boolean form -> JSON Schema number form
            out["exclusiveMinimum"] = out.pop("minimum")
        if node.get("x-kubernetes-int-or-string"):
            out.pop("anyOf", None)
            out["type"] = ["integer", "string"]
        return out
    if isinstance(node, list):
        return [_to_jsonschema(v) for v in node]
    return node


def validate_resource(obj: dict[str, Any]) -> None:
    """kubernetes-validate for built-in kinds; the CRD schema for StageServeDeployment."""
    if obj["kind"] == "StageServeDeployment":
        jsonschema.validate(obj, crd_schema())
    elif obj["kind"] not in CUSTOM_KINDS:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
