#!/usr/bin/env bash
# The GPU check as one call on the lent GPU machine (issue 6); everything lands in ${OUT:-./gpu_check_out}:
#   bash benchmarks/gpu_check.sh [extra benchmarks/gpu_check.py flags]
# Device call (fill .whl/ first with `bash benchmarks/gpu_wheels.sh` in the checkout the device tool sends):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# Writes gpu_check.json (the figures, see gpu_check.py's docstring) and gpu_check.log (this script's whole output).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-./gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"

run() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: none"
    if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
        if ls .whl/*.whl >/dev/null 2>&1; then
            echo "deepspeed missing: installing the carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                .whl/*.whl || return 1
            export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        else
            echo "deepspeed missing and no .whl/*.whl carried: run benchmarks/gpu_wheels.sh and carry .whl" >&2
            return 1
        fi
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    # python's own --budget_s (330 s) starts no phase late; this outer limit only ends a hang before the call's
    timeout -k 10 "${GPU_CHECK_TIMEOUT:-420}" "$PY" benchmarks/gpu_check.py --out_dir "$OUT_DIR" "$@"
}

run "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
