"""The kopf handlers, called as kopf calls them, with the real adapters (kubernetes -> recording HTTP server)."""

from __future__ import annotations

import logging

import kopf
import pytest

from stageserve_operator import handlers

from .conftest import free_port

SPEC = {
    "autoscaling": {"prometheusUrl": "http://127.0.0.1:1", "replanIntervalSeconds": 60},
    "stages": {"prefill": {"replicas": 2, "minReplicas": 1, "maxReplicas": 4}},
}


@pytest.fixture
def kube(recorder, monkeypatch):
    adapter, seen = recorder
    monkeypatch.setattr(handlers, "_kube", lambda: adapter)
    return seen


def call(handler, spec, status=None):
    patch = kopf.Patch()
    handler(name="demo", namespace="ml", uid="u-1", spec=spec, status=status or {}, meta={"generation": 4},
            patch=patch, logger=logging.getLogger("test"))
    return patch


def test_create_applies_every_object_and_patches_status(kube):
    patch = call(handlers.apply_spec, SPEC)
    applied = [r for r in kube if r["method"] == "PATCH"]
    assert len(applied) == 15  # ConfigMap, Service, Deployment per stage (no PodMonitors asked for)
    prefill = next(r["body"] for r in applied if r["path"].endswith("/deployments/demo-prefill"))
    assert prefill["spec"]["replicas"] == 2
    status = patch["status"]
    assert status["observedGeneration"] == 4 and status["stages"]["prefill"]["replicas"] == 2
    assert status["stages"]["prefill"]["reason"] == "no metrics yet"
    # the recording API server lists one schedulable 8-GPU node: everything lands there
    assert status["placement"]["nodes"] == {"decode": {"gpu-a": 1}, "prefill": {"gpu-a": 2}, "encoder": {"gpu-a": 1}}
    assert status["placement"]["unplaced"] == {} and status["placement"]["freeGpus"] == {"gpu-a": 4}
    affinity = prefill["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["gpu-a"]


def test_timer_keeps_replicas_when_prometheus_is_unreachable(kube, caplog):
    spec = {**SPEC, "autoscaling": {**SPEC["autoscaling"], "prometheusUrl": f"http://127.0.0.1:{free_port()}"}}
    with caplog.at_level(logging.WARNING):
        patch = call(handlers.replan, spec, status={"stages": {"prefill": {"replicas": 3}}})
    assert "metrics unavailable" in caplog.text
    prefill = next(r["body"] for r in kube if r["path"].endswith("/deployments/demo-prefill"))
    assert prefill["spec"]["replicas"] == 3  # the autoscaler's last word, kept
    assert patch["status"]["stages"]["prefill"]["replicas"] == 3


def test_bad_spec_is_a_permanent_error_naming_the_field(kube):
    with pytest.raises(kopf.PermanentError, match=r"spec\.stages\.gateway\.replicas"):
        call(handlers.apply_spec, {"stages": {"gateway": {"replicas": 3}}})
    assert kube == [] or all(r["method"] == "GET" for r in kube)  # nothing written
