"""Opt-in (``STAGESERVE_E2E_LOCAL=1``): ``stageserve operator --local`` over the real stages and the model.

Five model-serving processes plus the ones it adds take 1–2 minutes and both cores of the dev machine, so
this does not run by default; ``test_local.py`` covers the same loop with stand-in replicas in CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import free_port, wait_for

pytestmark = pytest.mark.skipif(os.environ.get("STAGESERVE_E2E_LOCAL") != "1",
                                reason="set STAGESERVE_E2E_LOCAL=1 (starts the real stages; 1-2 min)")
STAGESERVE = Path(sys.executable).with_name("stageserve")


def chat(url: str, stop: threading.Event, done: list[int]) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Tell a long story about a castle by the sea."}],
                       "max_tokens": 32}).encode()
    while not stop.is_set():
        req = urllib.request.Request(url, body, {"content-type": "application/json"})
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=120).read()
            done.append(1)
        except OSError:
            time.sleep(0.5)


def test_real_stages_scale_up_under_load_and_back_down(tmp_path):
    ports = {s: (free_port(), free_port()) for s in ("throttler", "encoder", "prefill", "decode")}
    http = free_port()
    config = {"host": "127.0.0.1", "gateway": {"http_port": http, "grpc_port": free_port()},
              **{s: {"port": p, "metrics_port": m} for s, (p, m) in ports.items()}}
    config["prefill"]["kv_cache_memory_bytes"] = 128 << 20
    config["decode"]["kv_cache_memory_bytes"] = 256 << 20
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    resource = {"apiVersion": "stageserve.io/v1alpha1", "kind": "StageServeDeployment", "metadata": {"name": "e2e"},
                "spec": {"slo": {"ttftP99": 30, "itlP99": 5},
                         "autoscaling": {"replanIntervalSeconds": 5, "scaleDownWindowSeconds": 15, "cooldownSeconds": 2,
                                         "maxScaleDownFraction": 0.5, "metricsWindow": "10s", "settleSeconds": 20},
                         "stages": {"prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 2,
                                                "capacityTokensPerSecond": 4},
                                    "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 2,
                                               "capacityTokensPerSecond": 2}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(resource))
    status = tmp_path / "status.json"
    proc = subprocess.Popen([str(STAGESERVE), "operator", "--local", "--config", str(tmp_path / "c.yaml"),
                             "--resource", str(tmp_path / "r.yaml"), "--prometheus-port", str(free_port()),
                             "--tick", "2", "--status-file", str(status)],
                            stdout=open(tmp_path / "out.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    stop, done = threading.Event(), []
    try:
        url = f"http://127.0.0.1:{http}/v1/chat/completions"
        wait_for(lambda: status.exists(), 120, 1, what="first status")
        clients = [threading.Thread(target=chat, args=(url, stop, done), daemon=True) for _ in range(3)]
        for c in clients:
            c.start()
        wait_for(lambda: json.loads(status.read_text())["stages"]["prefill"]["replicas"] == 2
                 and json.loads(status.read_text())["stages"]["decode"]["replicas"] == 2, 120, 1, what="scale up")
        stop.set()
        assert done, "no request completed through the gateway"
        wait_for(lambda: json.loads(status.read_text())["stages"]["prefill"]["replicas"] == 1
                 and json.loads(status.read_text())["stages"]["decode"]["replicas"] == 1, 120, 1, what="scale down")
    finally:
        stop.set()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    log = (tmp_path / "out.log").read_text()
    assert "prefill: 1 -> 2 (scale up to 2" in log and "prefill: 2 -> 1 (scale down to 1" in log
