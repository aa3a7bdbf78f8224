#!/usr/bin/env bash
# Create .venv and install ad2-ds with its dependencies. torch comes first, pinned, so pip takes the local CPU
# wheel instead of a multi-GB CUDA build (override with TORCH_SPEC="torch==X" on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test]"
