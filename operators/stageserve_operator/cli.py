"""``stageserve operator [--local]``: the kopf operator in a cluster, or the local actuator on this machine."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml


def add_operator_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("operator", help="run the Kubernetes operator, or --local to autoscale local processes")
    p.add_argument("--local", action="store_true", help="drive stage processes on this machine instead of a cluster")
    p.add_argument("--namespace", default=None, help="cluster mode: watch one namespace (default: all)")
    p.add_argument("--liveness", default=None, help="cluster mode: kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--resource", default=None, help="local: StageServeDeployment YAML (default: built-in)")
    p.add_argument("--config", default=None, help="local: stageserve YAML config of the stack")
    p.add_argument("--prometheus", default=None, help="local: Prometheus base URL (default: start one)")
    p.add_argument("--prometheus-port", type=int, default=9090, help="local: port of the Prometheus it starts")
    p.add_argument("--tick", type=float, default=5.0, help="local: seconds between observe/plan/act rounds")
    p.add_argument("--status-file", default=None, help="local: write the status JSON here after every round")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve the operator's own metrics here (cluster default 9108; local: also scraped)")
    p.add_argument("--stages", default=None, help="local: run only these stages, e.g. prefill,decode (default: all)")
    p.add_argument("--stage-command", default=None, metavar="TEMPLATE",
                   help="local: argv of one replica with {stage} {config} {replica} placeholders "
                        "(default: python -m stageserve.serving.{stage} --config {config} --replica {replica})")
    p.set_defaults(func=run_operator)
    return p


DEFAULT_RESOURCE = """
apiVersion: stageserve.io/v1alpha1
kind: StageServeDeployment
metadata: {name: local}
spec:
  autoscaling: {replanIntervalSeconds: 30, scaleDownWindowSeconds: 120, cooldownSeconds: 15, metricsWindow: 30s}
  stages:
    prefill: {replicas: 1, minReplicas: 1, maxReplicas: 3, capacityTokensPerSecond: 400}
    decode: {replicas: 1, minReplicas: 1, maxReplicas: 3, capacityTokensPerSecond: 40}
"""


def run_operator(args: argparse.Namespace) -> int:
    if not args.local:
        import kopf

        import stageserve_operator.handlers as handlers  # registers the handlers

        handlers.METRICS.serve(args.metrics_port if args.metrics_port is not None else 9108)

        try:
            kopf.run(standalone=True, namespaces=[args.namespace] if args.namespace else [],
                     clusterwide=not args.namespace, liveness_endpoint=args.liveness)
        except kopf.LoginError as exc:
            print(f"stageserve operator: no Kubernetes credentials (in-cluster or kubeconfig): {exc}", file=sys.stderr)
            print("  (run `stageserve operator --local` to drive processes on this machine)", file=sys.stderr)
            return 2
        return 0
    return _run_local(args)


def _run_local(args: argparse.Namespace) -> int:
    from stageserve_operator.adapters.prometheus import Prometheus
    from stageserve_operator.local import LocalOperator, LocalStack, load_resource
    from stageserve_operator.spec import STAGE_NAMES, parse_spec

    if args.resource:
        name, spec = load_resource(args.resource)
    else:
        name, spec = "local", parse_spec(yaml.safe_load(DEFAULT_RESOURCE)["spec"])
    config = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else STAGE_NAMES
    unknown = set(stages) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"--stages: unknown stage {sorted(unknown)[0]!r} (stages: {', '.join(STAGE_NAMES)})")
    command = _command_factory(args.stage_command)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    workdir = tempfile.mkdtemp(prefix="stageserve-operator-")
    targets = os.path.join(workdir, "targets.json")
    Path(targets).write_text("[]")
    prom_proc = None
    try:
        url = args.prometheus
        if url is None:
            prom_proc = _start_prometheus(workdir, targets, args.prometheus_port)
            url = f"http://127.0.0.1:{args.prometheus_port}"
            print(f"[operator] started Prometheus on {url} (scraping {targets})", flush=True)
        stack = LocalStack(config, spec, targets, command=command)
        metrics = None
        if args.metrics_port is not None:
            from stageserve_operator.adapters.exporter import OperatorMetrics

            metrics = OperatorMetrics()
            metrics.serve(args.metrics_port, addr="127.0.0.1")
            stack.extra_targets.append({"targets": [f"127.0.0.1:{args.metrics_port}"],
                                        "labels": {"stage": "operator"}})
        op = LocalOperator(spec, stack, Prometheus(url), stages=stages, status_file=args.status_file,
                           metrics=metrics, name=name)
        op.run(args.tick, stop)
    finally:
        if prom_proc is not None:
            prom_proc.terminate()
            try:
                prom_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prom_proc.kill()
                prom_proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    print("[operator] stopped", file=sys.stderr)
    return 0


def _command_factory(template_text: str | None):  # noqa: ANN202
    if not template_text:
        return None
    template = shlex.split(template_text)

    def command(stage: str, replica: int, config_path: str) -> list[str]:
        return [part.format(stage=stage, config=config_path, replica=replica) for part in template]

    return command


def _start_prometheus(workdir: str, targets: str, port: int) -> subprocess.Popen:
    from stageserve_operator.local import prometheus_config

    cfg = os.path.join(workdir, "prometheus.yml")
    Path(cfg).write_text(prometheus_config(targets))
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    return subprocess.Popen(
        [binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir}/tsdb",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
