"""Operator test helpers: a real Prometheus on a free 127.0.0.1 port, started and stopped by the test."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[dict], str]]:
    """start(config_dict) -> base URL of a real Prometheus using that config; stopped after the test."""
    if not Path(PROMETHEUS).exists():
        pytest.skip("prometheus binary not installed")
    procs: list[subprocess.Popen] = []

    def start(config: dict) -> str:
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "w")
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            try:
                with opener.open(f"{url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return url
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("prometheus not ready within 30 s")

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.5, what: str = "") -> object:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate} (last: {last!r})")


NODES = {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": [
    {"metadata": {"name": "gpu-a"}, "spec": {}, "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "96"}}},
    {"metadata": {"name": "cpu-only"}, "spec": {}, "status": {"allocatable": {"cpu": "8"}}},
    {"metadata": {"name": "gpu-cordoned"}, "spec": {"unschedulable": True},
     "status": {"allocatable": {"nvidia.com/gpu": "8"}}},
]}


@pytest.fixture
def recorder():
    """(Kubernetes adapter pointed at a recording HTTP server, list of the requests it received)."""
    from kubernetes import client as k8s

    from stageserve_operator.adapters.k8s import Kubernetes

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
