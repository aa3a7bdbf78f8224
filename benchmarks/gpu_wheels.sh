#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine lacks for benchmarks/gpu_check.sh: Python 3.12, manylinux x86_64.
# Run HERE, on the CPU machine where pip reaches PyPI, in the checkout the device tool sends; then carry ".whl":
#   bash benchmarks/gpu_wheels.sh            # PYTHON=... picks the interpreter (it needs torch to build deepspeed)
# The GPU image has torch, transformers, numpy, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm, packaging
# (/work/.library/device/KINDS.md) but no deepspeed, hjson or pydantic. DeepSpeed ships no wheel on PyPI: its sdist is
# built here into a pure-Python one (DS_BUILD_OPS=0: no op compiled; the check needs none). Versions are the ones the
# project's venv runs (tests pass with them); pydantic-core is the only binary wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
"$PY" -c "import torch, setuptools, wheel" || { echo "$PY needs torch, setuptools and wheel to build deepspeed" >&2; exit 1; }
PURE="hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
BINARY="pydantic-core==2.50.5"
rm -rf .whl
mkdir -p .whl
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $PURE $BINARY
ls -l .whl
du -sh .whl
git check-ignore -q .whl || echo "WARNING: .whl/ is not git-ignored: it would travel twice (tracked and carried)" >&2
