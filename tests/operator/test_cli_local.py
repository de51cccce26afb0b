"""``stageserve operator --local`` as a user runs it: it starts its own Prometheus, the replicas, and stops cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from stageserve_operator.adapters.prometheus import Prometheus

from .conftest import free_port, wait_for

STANDIN = Path(__file__).with_name("stage_standin.py")
STAGESERVE = Path(sys.executable).with_name("stageserve")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cli_local_runs_min_replicas_with_its_own_prometheus_and_stops_everything(tmp_path):
    config = {"host": "127.0.0.1", "prefill": {"port": free_port(), "metrics_port": free_port()},
              "decode": {"port": free_port(), "metrics_port": free_port()}}
    (tmp_path / "stageserve.yaml").write_text(yaml.safe_dump(config))
    resource = {"apiVersion": "stageserve.io/v1alpha1", "kind": "StageServeDeployment", "metadata": {"name": "t"},
                "spec": {"autoscaling": {"replanIntervalSeconds": 2, "metricsWindow": "4s"},
                         "stages": {"prefill": {"replicas": 2, "minReplicas": 2, "maxReplicas": 3},
                                    "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 2}}}}
    (tmp_path / "ssd.yaml").write_text(yaml.safe_dump(resource))
    prom_port, metrics_port = free_port(), free_port()
    status = tmp_path / "status.json"
    proc = subprocess.Popen(
        [str(STAGESERVE), "operator", "--local", "--config", str(tmp_path / "stageserve.yaml"),
         "--resource", str(tmp_path / "ssd.yaml"), "--prometheus-port", str(prom_port), "--tick", "1",
         "--status-file", str(status), "--stages", "prefill,decode", "--metrics-port", str(metrics_port),
         "--stage-command", f"{sys.executable} {STANDIN} {{stage}} {{config}} {{replica}}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ports = [config["prefill"]["port"], config["prefill"]["port"] + 10, config["decode"]["port"]]
    try:
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        wait_for(lambda: all(listening(p) for p in ports), 30, what="replicas listening")
        wait_for(lambda: prom.ready() and prom.scalar('count(up{stage="prefill"} == 1)') == 2, 30,
                 what="Prometheus scraping both prefill replicas")
        wait_for(lambda: status.exists() and "load" in json.loads(status.read_text())["stages"]["prefill"], 30,
                 what="status with load")
        s = json.loads(status.read_text())["stages"]
        assert (s["prefill"]["replicas"], s["decode"]["replicas"]) == (2, 1)  # min replicas at no load
        assert s["prefill"]["load"]["tokensPerSecond"] == 0
        assert not listening(config["prefill"]["port"] + 20)  # no third prefill without load
        # the operator's own metrics, scraped by the same Prometheus
        wait_for(lambda: prom.scalar('stageserve_replicas{deployment="t",stage="prefill"}') == 2, 30,
                 what="operator metrics in Prometheus")
        assert prom.scalar('stageserve_desired_replicas{deployment="t",stage="decode"}') == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "started Prometheus" in out and "started prefill-1" in out and "[operator] stopped" in out
    assert not any(listening(p) for p in ports + [prom_port])  # replicas and Prometheus are gone


def test_cli_local_rejects_an_unknown_stage_before_starting_anything(capsys):
    from stageserve.cli import main

    prom_port = free_port()
    assert main(["operator", "--local", "--stages", "prefill,router", "--prometheus-port", str(prom_port)]) == 2
    assert "--stages: unknown stage 'router'" in capsys.readouterr().err
    assert not listening(prom_port)
