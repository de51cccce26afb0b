#!/usr/bin/env bash
# Generates services/stageserve/v1/*_pb2{,_grpc}.py(i) from protos/stageserve/v1/*.proto with grpcio-tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I protos --python_out=services --grpc_python_out=services --pyi_out=services \
  protos/stageserve/v1/*.proto
echo "protos: generated $(ls services/stageserve/v1/*_pb2.py | wc -l) modules into services/stageserve/v1"
