#!/usr/bin/env bash
# The GPU check as one call on the lent GPU machine (issue 6); everything lands in ${OUT:-./gpu_check_out}:
#   bash benchmarks/gpu_check.sh [extra benchmarks/gpu_check.py flags]
#   GPU_CHECK_PHASES="teacher_checks" bash benchmarks/gpu_check.sh     # only the phases named, in that order
# Device call (fill .whl/ first with `bash benchmarks/gpu_wheels.sh` in the checkout the device tool sends):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# Each phase is a process of its own (benchmarks/gpu_check.py --phases NAME; the phases' modules are
# benchmarks/gpu_check_steps.py and gpu_check_teachers.py), adding its figures to the same gpu_check.json, so one
# that dies leaves the others' figures. Writes gpu_check.json (see gpu_check.py's docstring) and gpu_check.log (this
# script's whole output).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-./gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
PHASES="${GPU_CHECK_PHASES:-steps teacher_checks}"

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
    # Both limits count from the first phase: python's --budget_s (330 s) starts no precision or phase late; the
    # outer timeout (420 s) only ends a hang before the call's own limit.
    local start=$SECONDS status=0 phase left
    for phase in $PHASES; do
        left=$(( ${GPU_CHECK_TIMEOUT:-420} - (SECONDS - start) ))
        if (( left < 10 )); then
            echo "phase $phase: not started, the ${GPU_CHECK_TIMEOUT:-420} s limit is spent" >&2
            status=1
            continue
        fi
        echo "== phase $phase"
        timeout -k 10 "$left" "$PY" benchmarks/gpu_check.py --phases "$phase" --out_dir "$OUT_DIR" \
            --budget_s "$(( ${GPU_CHECK_BUDGET:-330} - (SECONDS - start) ))" "$@" || status=1
    done
    return $status
}

run "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
