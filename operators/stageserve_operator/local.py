"""The local actuator: ``stageserve operator --local`` runs the operator loop against processes on this machine.

It reads a StageServeDeployment manifest (the same YAML as in Kubernetes) and a stageserve config file,
starts the fixed stages (gateway, throttler) once and the autoscaled stages' replicas as processes
(``python -m stageserve.serving.STAGE --config FILE --replica N``, replica i on ``port + 10·i``), keeps a
Prometheus ``file_sd`` target list of every replica's metrics port (label ``stage``), and every ``tick_s``
reads the load from a real Prometheus, runs the same pure ``reconcile`` as the Kubernetes operator and
starts or stops replicas to match. The config handed to the stages lists ``maxReplicas`` replicas per scaled
stage, so the gateway polls every address a replica may appear on and routes only to the healthy ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from stageserve_operator.adapters.prometheus import Prometheus, PrometheusError
from stageserve_operator.policy.autoscale import StageLoad
from stageserve_operator.reconcile import current_replicas, reconcile, render_status
from stageserve_operator.spec import SCALED_STAGES, STAGE_NAMES, DeploymentSpec, parse_spec

REPLICA_PORT_STRIDE = 10
DEFAULT_PORTS = {"gateway": (50051, 8000), "throttler": (50052, 9102), "encoder": (50053, 9103),
                 "prefill": (50054, 9104), "decode": (50055, 9105)}
CommandFactory = Callable[[str, int, str], Sequence[str]]


def load_resource(path: str) -> tuple[str, DeploymentSpec]:
    """(name, spec) of the StageServeDeployment in a YAML file."""
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("kind") != "StageServeDeployment":
        raise ValueError(f"{path}: expected a StageServeDeployment manifest")
    return str(doc.get("metadata", {}).get("name", "local")), parse_spec(doc.get("spec") or {})


def stage_ports(config: dict[str, Any], stage: str) -> tuple[int, int]:
    """(gRPC port, metrics port) of replica 0 from a stageserve config dict (DESIGN §3 defaults)."""
    section = config.get(stage) or {}
    grpc_port, metrics_port = DEFAULT_PORTS[stage]
    if stage == "gateway":
        return int(section.get("grpc_port", grpc_port)), int(section.get("http_port", metrics_port))
    return int(section.get("port", grpc_port)), int(section.get("metrics_port", metrics_port))


@dataclass
class Replica:
    stage: str
    index: int
    popen: subprocess.Popen


@dataclass
class LocalStack:
    """Owns the stage processes; ``scale(stage, n)`` starts or stops the highest-numbered replicas."""

    config: dict[str, Any]
    spec: DeploymentSpec
    targets_file: str
    command: CommandFactory | None = None
    log: IO[str] = sys.stdout
    grace_s: float = 5.0
    replicas: dict[str, list[Replica]] = field(default_factory=dict)
    config_path: str = ""
    extra_targets: list[dict[str, Any]] = field(default_factory=list)  # more file_sd groups (the operator)

    def __post_init__(self) -> None:
        cfg = json.loads(json.dumps(self.config))  # deep copy
        for stage in SCALED_STAGES:  # the gateway learns every address a replica may take
            cfg.setdefault(stage, {})["replicas"] = max(1, self.spec.stages[stage].max_replicas)
        fd, self.config_path = tempfile.mkstemp(prefix="stageserve-local-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(cfg, f)

    def argv(self, stage: str, index: int) -> list[str]:
        if self.command is not None:
            return list(self.command(stage, index, self.config_path))
        return [sys.executable, "-m", f"stageserve.serving.{stage}", "--config", self.config_path,
                "--replica", str(index)]

    def count(self, stage: str) -> int:
        return len(self.replicas.get(stage, []))

    def scale(self, stage: str, n: int) -> None:
        live = self.replicas.setdefault(stage, [])
        while len(live) < n:
            index = len(live)
            popen = subprocess.Popen(self.argv(stage, index), stdin=subprocess.DEVNULL, start_new_session=True)
            live.append(Replica(stage, index, popen))
            self.say(f"started {stage}-{index} (pid {popen.pid})")
        while len(live) > n:
            replica = live.pop()
            self._stop(replica)
            self.say(f"stopped {stage}-{replica.index}")
        self.write_targets()

    def restart_exited(self) -> list[str]:
        """Starts again every replica whose process has exited (what a Deployment's controller does)."""
        restarted = []
        for live in self.replicas.values():
            for i, replica in enumerate(live):
                code = replica.popen.poll()
                if code is None:
                    continue
                popen = subprocess.Popen(self.argv(replica.stage, replica.index), stdin=subprocess.DEVNULL,
                                         start_new_session=True)
                live[i] = Replica(replica.stage, replica.index, popen)
                name = f"{replica.stage}-{replica.index}"
                self.say(f"{name} exited with code {code}; restarted (pid {popen.pid})")
                restarted.append(name)
        return restarted

    def write_targets(self) -> None:
        """Prometheus file_sd: one group per running replica, labelled with its stage and replica."""
        host = str(self.config.get("host", "127.0.0.1"))
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        groups = []
        for stage, live in self.replicas.items():
            base = stage_ports(self.config, stage)[1]
            for r in live:
                port = base if stage == "gateway" else base + REPLICA_PORT_STRIDE * r.index
                groups.append({"targets": [f"{host}:{port}"], "labels": {"stage": stage, "replica": str(r.index)}})
        tmp = self.targets_file + ".tmp"
        Path(tmp).write_text(json.dumps(groups + self.extra_targets))
        os.replace(tmp, self.targets_file)  # atomic: Prometheus never reads half a file

    def _stop(self, replica: Replica) -> None:
        if replica.popen.poll() is None:
            _killpg(replica.popen.pid, signal.SIGTERM)
            try:
                replica.popen.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                _killpg(replica.popen.pid, signal.SIGKILL)
                replica.popen.wait(timeout=5.0)

    def stop_all(self) -> None:
        """SIGTERM to every replica at once, then wait (SIGKILL after ``grace_s``)."""
        everyone = [r for stage in reversed(STAGE_NAMES) for r in reversed(self.replicas.get(stage, []))]
        for replica in everyone:
            if replica.popen.poll() is None:
                _killpg(replica.popen.pid, signal.SIGTERM)
        for replica in everyone:
            self._stop(replica)
        self.replicas = {}
        self.write_targets()
        if self.config_path and os.path.exists(self.config_path):
            os.unlink(self.config_path)

    def say(self, message: str) -> None:
        self.log.write(f"[operator] {message}\n")
        self.log.flush()


def _killpg(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class LocalOperator:
    """The operator loop on one machine: observe (Prometheus) -> reconcile (pure) -> act (processes)."""

    spec: DeploymentSpec
    stack: LocalStack
    prometheus: Prometheus
    stages: tuple[str, ...] = STAGE_NAMES
    status_file: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    metrics: Any = None  # an adapters.exporter.OperatorMetrics, or None
    name: str = "local"

    def start(self) -> None:
        for stage, n in current_replicas(self.spec, self.status).items():
            if stage in self.stages:
                self.stack.scale(stage, n)

    def loads(self) -> dict[str, StageLoad]:
        out = {}
        for stage in SCALED_STAGES:
            if stage in self.stages and self.spec.stages[stage].autoscaled:
                slo = self.spec.ttft_p99_s if stage != "decode" else self.spec.itl_p99_s
                out[stage] = self.prometheus.stage_load(stage, self.spec.autoscaling.metrics_window, slo)
        return out

    def step(self, now: float) -> dict[str, int]:
        """One observe-plan-act round at wall time ``now``; returns the replicas per stage after it."""
        self.stack.restart_exited()
        try:
            loads = self.loads()
        except PrometheusError as exc:
            self.stack.say(f"metrics unavailable, holding: {exc}")
            return {s: self.stack.count(s) for s in self.stages}
        result = reconcile(self.spec, self.status, loads, now)
        for stage, decision in result.decisions.items():
            if decision.replicas != self.stack.count(stage):
                self.stack.say(f"{stage}: {self.stack.count(stage)} -> {decision.replicas} ({decision.reason})")
            self.stack.scale(stage, decision.replicas)
        self.status = render_status(self.spec, self.status, result, loads, now)
        if self.metrics is not None:
            self.metrics.record(self.name, self.status)
        if self.status_file:
            tmp = self.status_file + ".tmp"
            Path(tmp).write_text(json.dumps(self.status, indent=1))
            os.replace(tmp, self.status_file)
        return {s: self.stack.count(s) for s in self.stages}

    def run(self, tick_s: float, stop: threading.Event) -> None:
        self.start()
        try:
            while not stop.wait(tick_s):
                self.step(time.time())
        finally:
            self.stack.stop_all()


def prometheus_config(targets_file: str, scrape_interval: str = "2s") -> str:
    """A Prometheus config that scrapes the local stack through the actuator's file_sd target list."""
    return yaml.safe_dump({
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [{"job_name": "stageserve-local", "honor_labels": True,  # series' own stage labels win
                            "file_sd_configs": [{"files": [targets_file], "refresh_interval": "1s"}]}],
    })
