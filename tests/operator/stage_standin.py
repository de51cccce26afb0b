"""A stand-in stage process for the local actuator test: real prometheus_client metrics, no model.

    python stage_standin.py STAGE CONFIG REPLICA

Listens like replica REPLICA of STAGE would (``port + 10·i``) but over plain HTTP: ``POST /work?tokens=N``
counts N prompt tokens (prefill) or N generated tokens (decode), as serving a request of that size
would. Exports the DESIGN §3 names on ``metrics_port + 10·i``. It stands in for the model so the operator
loop (processes, file_sd, Prometheus, policy) runs end to end within seconds on a 2-core machine.
"""

from __future__ import annotations

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


def main() -> None:
    stage, config_path, replica = sys.argv[1], sys.argv[2], int(sys.argv[3])
    section = (yaml.safe_load(open(config_path)) or {}).get(stage) or {}
    port = int(section["port"]) + 10 * replica
    metrics_port = int(section["metrics_port"]) + 10 * replica
    reg = CollectorRegistry()
    if stage == "prefill":
        tokens = Counter("vllm:prompt_tokens", "prompt tokens", ["model_name"], registry=reg).labels("standin")
        Gauge("vllm:num_requests_waiting", "waiting", ["model_name"], registry=reg).labels("standin").set(0)
        latency = Histogram("vllm:time_to_first_token_seconds", "ttft", ["model_name"], registry=reg).labels("standin")
    else:
        tokens = Counter("vllm:generation_tokens", "generated", ["model_name"], registry=reg).labels("standin")
        Gauge("vllm:num_requests_running", "running", ["model_name"], registry=reg).labels("standin").set(1)
        Gauge("vllm:kv_cache_usage_perc", "kv", ["model_name"], registry=reg).labels("standin").set(0.1)
        latency = Histogram("vllm:inter_token_latency_seconds", "itl", ["model_name"], registry=reg).labels("standin")
    start_http_server(metrics_port, addr="127.0.0.1", registry=reg)

    class Work(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            n = int(parse_qs(urlparse(self.path).query).get("tokens", ["0"])[0])
            tokens.inc(n)
            latency.observe(0.05)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Work)
    print(f"{stage}-{replica} on {port}, metrics on {metrics_port}", flush=True)
    try:
        server.serve_forever()
    finally:
        time.sleep(0)


if __name__ == "__main__":
    main()
