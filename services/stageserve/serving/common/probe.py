"""A grpc.health.v1 check for Kubernetes exec probes when stages serve mTLS (kubelet's grpc probe cannot).

``python -m stageserve.serving.common.probe --config /etc/stageserve/stageserve.yaml --port 50054``: exit 0
when the local stage reports SERVING, 1 otherwise; the channel uses the config's ``tls`` client certificate.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stageserve.serving.common import tls
from stageserve.serving.common.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    with tls.sync_channel(f"127.0.0.1:{args.port}", config.tls) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
