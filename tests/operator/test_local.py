"""``stageserve operator --local`` loop end to end: real processes, a real Prometheus, file_sd discovery.

What is real: the actuator starts and stops one OS process per replica, writes the file_sd target list,
Prometheus (started here) discovers and scrapes the replicas, the operator reads the load through the
Prometheus HTTP API and runs the same pure reconcile as in Kubernetes. What stands in: the replica
processes are ``stage_standin.py`` (real prometheus_client metrics with the vLLM names, token counters
driven by HTTP requests of the load generator below) instead of the model-serving stages, so the test
runs in well under a minute on 2 cores. Timings are shortened (re-plan 2 s, scale-down window 6 s).
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from stageserve_operator.adapters.prometheus import Prometheus
from stageserve_operator.local import LocalOperator, LocalStack, prometheus_config
from stageserve_operator.spec import parse_spec

from .conftest import free_port, wait_for

STANDIN = Path(__file__).with_name("stage_standin.py")
SPEC = {
    "autoscaling": {"replanIntervalSeconds": 2, "scaleDownWindowSeconds": 6, "cooldownSeconds": 1,
                    "maxScaleDownFraction": 0.5, "metricsWindow": "4s"},
    "stages": {
        "prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 3, "capacityTokensPerSecond": 1000},
        "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 3, "capacityTokensPerSecond": 100},
    },
}


class LoadGenerator(threading.Thread):
    """Sends requests of ``tokens`` tokens to whichever replicas answer (like the gateway's healthy set)."""

    def __init__(self, ports: dict[str, list[int]], tokens_per_s: dict[str, float]) -> None:
        super().__init__(daemon=True)
        self.ports, self.rate = ports, dict(tokens_per_s)
        self.halt = threading.Event()
        self.sent = dict.fromkeys(ports, 0)

    def run(self) -> None:
        turn, last = 0, time.monotonic()
        while not self.halt.wait(0.1):
            now = time.monotonic()
            elapsed, last = now - last, now  # tokens for the time that really passed (busy machines lag)
            for stage, ports in self.ports.items():
                chunk = int(self.rate[stage] * elapsed)
                for _ in range(len(ports)):
                    port = ports[turn % len(ports)]
                    turn += 1
                    try:
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                        conn.request("POST", f"/work?tokens={chunk}")
                        conn.getresponse().read()
                        conn.close()
                        self.sent[stage] += chunk
                        break
                    except OSError:
                        continue  # that replica is not running


def test_load_up_scales_prefill_and_decode_up_and_back_down_after_the_window(tmp_path, start_prometheus):
    config = {"host": "127.0.0.1"}
    for stage in ("prefill", "decode"):
        base = free_port()
        config[stage] = {"port": base, "metrics_port": free_port()}
    targets = str(tmp_path / "targets.json")
    Path(targets).write_text("[]")
    import yaml
    url = start_prometheus(yaml.safe_load(prometheus_config(targets, scrape_interval="1s")))
    spec = parse_spec(SPEC)
    log = open(tmp_path / "operator.log", "w")
    stack = LocalStack(config, spec, targets, command=lambda s, i, cfg: [sys.executable, str(STANDIN), s, cfg, str(i)],
                       log=log, grace_s=3)
    status_file = str(tmp_path / "status.json")
    op = LocalOperator(spec, stack, Prometheus(url), stages=("prefill", "decode"), status_file=status_file)
    stop = threading.Event()
    loop = threading.Thread(target=op.run, args=(1.0, stop), daemon=True)
    loop.start()
    prom = Prometheus(url)
    load = LoadGenerator({s: [config[s]["port"] + 10 * i for i in range(3)] for s in ("prefill", "decode")},
                         {"prefill": 2500, "decode": 250})
    try:
        wait_for(lambda: prom.scalar('count(up{stage="prefill"} == 1)') == 1, 30, what="prefill-0 scraped")
        load.start()
        wait_for(lambda: stack.count("prefill") == 3 and stack.count("decode") == 3, 45, what="scale up to 3")
        status = json.loads(Path(status_file).read_text())
        assert status["stages"]["prefill"]["replicas"] == 3
        assert 1000 < status["stages"]["prefill"]["load"]["tokensPerSecond"] < 4000
        log.flush()
        assert "(scale up to 3: tokens: " in (tmp_path / "operator.log").read_text()
        # Prometheus discovers the new replicas through the actuator's file_sd list
        wait_for(lambda: prom.scalar('count(up{stage="prefill"} == 1)') == 3, 20, what="3 prefill targets up")
        load.halt.set()
        load.join()
        stopped_at = time.monotonic()
        seen_stabilising = wait_for(lambda: "stabilising" in json.loads(Path(status_file).read_text())["stages"]
                                    ["prefill"]["reason"], 20, 0.2, what="stabilising")
        assert seen_stabilising and stack.count("prefill") == 3  # holds during the window
        wait_for(lambda: stack.count("prefill") == 1 and stack.count("decode") == 1, 45, what="scale down to 1")
        assert time.monotonic() - stopped_at >= 6  # not before the scale-down window
        final = json.loads(Path(status_file).read_text())
        assert final["summary"] == "encoder=1 prefill=1 decode=1"
        assert json.loads(Path(targets).read_text()) and len(json.loads(Path(targets).read_text())) == 2
    finally:
        load.halt.set()
        stop.set()
        loop.join(timeout=30)
        log.close()
    assert stack.count("prefill") == 0 and stack.count("decode") == 0
    assert "prefill: 1 -> 3" in (tmp_path / "operator.log").read_text() or \
        "prefill: 2 -> 3" in (tmp_path / "operator.log").read_text()


@pytest.mark.parametrize("bad", ["kind: Deployment\n", "- a\n"])
def test_local_resource_must_be_a_stageservedeployment(tmp_path, bad):
    from stageserve_operator.local import load_resource

    path = tmp_path / "r.yaml"
    path.write_text(bad)
    with pytest.raises(ValueError, match="StageServeDeployment"):
        load_resource(str(path))


def test_an_exited_replica_is_started_again(tmp_path):
    import os
    import signal

    config = {"host": "127.0.0.1", "prefill": {"port": free_port(), "metrics_port": free_port()}}
    targets = str(tmp_path / "targets.json")
    stack = LocalStack(config, parse_spec(SPEC), targets, log=open(tmp_path / "log", "w"), grace_s=3,
                       command=lambda s, i, cfg: [sys.executable, str(STANDIN), s, cfg, str(i)])
    try:
        stack.scale("prefill", 2)
        first = stack.replicas["prefill"][1].popen
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert stack.restart_exited() == ["prefill-1"]
        assert stack.replicas["prefill"][1].popen.pid != first.pid and stack.count("prefill") == 2
        assert stack.restart_exited() == []
        groups = json.loads(Path(targets).read_text())
        assert [g["labels"] for g in groups] == [{"stage": "prefill", "replica": "0"},
                                                 {"stage": "prefill", "replica": "1"}]
    finally:
        stack.stop_all()
