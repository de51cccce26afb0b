"""``stageserve operator [--local]``: the kopf operator in a cluster, or the local actuator on this machine."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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

        import stageserve_operator.handlers  # noqa: F401  (registers the handlers)

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
    from stageserve_operator.local import LocalOperator, LocalStack, load_resource, prometheus_config
    from stageserve_operator.spec import parse_spec

    if args.resource:
        _, spec = load_resource(args.resource)
    else:
        spec = parse_spec(yaml.safe_load(DEFAULT_RESOURCE)["spec"])
    config = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    workdir = tempfile.mkdtemp(prefix="stageserve-operator-")
    targets = os.path.join(workdir, "targets.json")
    Path(targets).write_text("[]")
    prom_proc = None
    url = args.prometheus
    if url is None:
        cfg = os.path.join(workdir, "prometheus.yml")
        Path(cfg).write_text(prometheus_config(targets))
        prom_proc = subprocess.Popen(
            [shutil.which("prometheus") or "/usr/bin/prometheus", f"--config.file={cfg}",
             f"--storage.tsdb.path={workdir}/tsdb", f"--web.listen-address=127.0.0.1:{args.prometheus_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{args.prometheus_port}"
        print(f"[operator] started Prometheus on {url} (scraping {targets})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack(config, spec, targets)
    op = LocalOperator(spec, stack, Prometheus(url), status_file=args.status_file)
    try:
        op.run(args.tick, stop)
    finally:
        if prom_proc is not None:
            prom_proc.terminate()
            try:
                prom_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prom_proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
        time.sleep(0)
    print("[operator] stopped", file=sys.stderr)
    return 0
