"""The GPU figures in one short run: AD2's step cost and memory under DeepSpeed on one lent GPU (issue 6).

    bash benchmarks/gpu_check.sh                                    # on the GPU machine; writes $OUT/gpu_check.json
    GPU_CHECK_PHASES=teacher_checks bash benchmarks/gpu_check.sh    # one phase (again): the others' figures are kept
    PYTHONPATH=. python benchmarks/gpu_check.py --cpu_smoke --out_dir /tmp/gc   # the same path on CPU, tiny models

Two phases, each a module of its own, run in this order by name (``--phases``; the shell script starts one process
per phase, so a phase that dies takes nothing else with it, and each adds its part to the same ``gpu_check.json``):

- ``steps`` (``benchmarks/gpu_check_steps.py``): step cost and memory per precision, below;
- ``teacher_checks`` (``benchmarks/gpu_check_teachers.py``): the sharded loader and a decoder teacher, below.

Both start from ``benchmarks/gpu_check_base.py``'s ``setup`` (the teacher, student and batch) and its memory meter.

What runs: a BERT-large-shaped teacher (24 x 1024, 16 heads, FFN 4096, vocab 30522, random weights, 2 labels,
eager attention since ad2's attention KD needs its maps) wrapped in ``DeepSpeedTeacher`` (``init_inference``, AutoTP,
tp_size = world size, i.e. 1 on the one lent GPU) in fp16; a 6 x 768 student (the paper's 6-layer student, random
weights, sdpa attention except where ad2's attention KD switches its copy to the pre-dropout eager one). One batch of
32 x 128 tokens (``step_cost.make_batch``: right-padded rows) serves every step.

Per precision (fp16, then bf16; ``steps``), one ZeRO-2 engine per method, built from the shipped
``ds_configs/zero2_fp16.json`` / ``zero2_bf16.json`` (``zero2.json`` for fp32) with their "auto" scheduler dropped and
their AdamW replaced by ``torch.optim.AdamW`` with the same hyper-parameters (``zero_allow_untested_optimizer``), so no
DeepSpeed op is JIT-compiled (the script refuses if one is about to be: ``--allow_jit`` lets it). Methods
(``step_cost.METHODS``): kd, ad2-dkd K=1 fast path, ad2-dkd K=1 naive, ad2 K=1 fast with deep KD (hidden states and
attention maps, uniform layer map 6 -> 24, learned 768 -> 1024 projections). Adversarial methods use epsilon = step
size = 1e-2 (a smaller ball rounds away in fp16/bf16; each row records the objective's ``delta_applied``, the share
of the perturbation's norm that survived rounding into the embedding output). Each engine runs with a *cached*
teacher (its ``TeacherOutput`` computed once, cast to the student's dtype, held on the GPU) and a *live* one (the
teacher forward inside the timed step). Beside the engines, a plain loop (same student, ``torch.autocast`` to the
phase's dtype, a ``GradScaler`` for fp16, ``torch.optim.AdamW``, gradient clipping as in the JSON) runs kd and
ad2-dkd fast with the cached teacher, to show what the engine adds.

``teacher_checks`` (issue 14): the teacher's weights, saved as sharded safetensors before wrapping, are loaded again by
``DeepSpeedTeacher.from_pretrained`` (shard by shard when tp_size > 1, the whole-model path at 1) and its logits
compared with the usual build's; then a TinyLlama-1.1B-shaped ``LlamaForSequenceClassification`` (22 x 2048, 32
heads, 4 kv heads; random, saved and loaded the same way) runs as a teacher on the batch. Both record load seconds,
weights, the allocated rise and peak of the load, and forward ms (``teacher_checks`` in the JSON).

Timing as in ``benchmarks/step_cost.py`` (its Runner, interleave and PassCounter are imported): every step ends with
``torch.cuda.synchronize()``, so wall time around a step is the GPU's time for it; the runners of a precision go
round-robin (start rotated each round) after untimed warm-up steps, with one untimed step at each switch; a row's time
is the median of all its timed steps; ``ratio_to_kd`` is that median over kd's of the same precision, loop and teacher
(kd's own is 1), ``per_round`` the range of the per-round ratios. samples/s = global batch / median step time.

Memory (MiB; ``torch.cuda`` allocator on GPU, process RSS on CPU where "reserved" has no meaning and is null):
- ``static``: allocated memory an engine (or the plain loop's student) adds, measured before building it and after its
  first real optimizer step (fp16 steps that overflow are skipped and create no Adam state: it warms until one is
  taken): weights, fp32 master copy, gradient buffers, Adam state;
- ``step_peak``: peak allocated during one step above what was allocated when it began (activations, the ascent's
  graph, teacher activations for a live row), measured after the timed rounds;
- ``teacher_side``: bytes of what the row needs from the teacher: its fp16 weights (live) or the cached outputs it
  reads (cached: logits only, or all hidden states and attention maps for ad2);
- ``alone_estimate`` = static + step_peak + teacher_side: what the row would need on a GPU of its own (the CUDA
  context and the allocator's rounding not included);
- ``build_peak`` / ``build_reserved``: the rise of max_memory_allocated / memory_reserved over building the engine
  and its warm-up steps (the cache emptied first, so the reserved rise is this configuration's own);
- per precision, ``max_allocated`` / ``max_reserved``: the allocator's peaks over it, all its runners resident;
  for the whole run, the same since the start (the highest of the phases' processes).
The JSON also records the card (``nvidia-smi``: name, memory, driver), torch/CUDA/cuDNN/NCCL, DeepSpeed (and where it
was imported from), transformers and Python versions, every step's time, pass counts, and per engine its global and
skipped steps and final loss scale. It is rewritten after each precision and phase (``"complete": false`` until
every phase ran), so a run cut short keeps what finished; a precision or check that raises is recorded under
``"errors"`` (its traceback), the next one still runs, and the exit code is 1. ``"phases_run"`` maps each phase that
ran to its process's flags.

Device call (a later session that is lent a GPU; ``.whl/`` filled first by ``bash benchmarks/gpu_wheels.sh`` in the
checkout the device tool sends, which is git-ignored and travels by ``carry``)::

    run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)

Written for the one lent GPU; under a multi-GPU launcher (torchrun) the teacher would shard over all ranks and rank 0
report its own figures, which nobody has tried yet. Not yet run on a GPU (the session that wrote it had none): its
wall time there is an estimate, 1-3 minutes (wheel install, imports, BERT-large init on the GPU, once per phase, two
precisions of ~600 short steps). Limits: ``--budget_s`` (330 s, counted by the shell script over all phases) starts
no precision or phase after that, and the shell script's ``timeout`` ends Python at 420 s after the first phase
began, inside the call's 480. The CPU smoke run takes ~11 s on the 2-core build machine. Afterwards copy
``gpu_check.json`` from the reply's files to ``docs/results/gpu_check.json`` and put its tables (stdout, also in
``gpu_check.log``) into ``docs/RESULTS.md`` with the card's name, memory and driver.
"""

import argparse
import json
import os
import sys
import time

import torch

import gpu_check_steps
import gpu_check_teachers
from gpu_check_base import DTYPES, SHAPES, setup
from gpu_check_steps import CHECK_METHODS
from step_cost import METHODS

PHASES = {m.NAME: m for m in (gpu_check_steps, gpu_check_teachers)}  # in the order they run

MODES = {
    "gpu": dict(precisions="fp16,bf16", teacher_dtype="fp16", batch_size=32, seq_len=128, rounds=8, steps=5,
                warmup=2, max_warm=12, budget_s=330.0),
    "cpu_smoke": dict(precisions="bf16,fp32", teacher_dtype="bf16", batch_size=4, seq_len=16, rounds=2, steps=1,
                      warmup=1, max_warm=4, budget_s=600.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu_smoke", action="store_true",
                   help="tiny models on CPU/gloo, bf16 and fp32 (fp16 is GPU-only): the same code path, in seconds")
    p.add_argument("--precisions", default=None, help="comma-separated: fp16, bf16, fp32 (gpu: fp16,bf16)")
    p.add_argument("--teacher_dtype", default=None, choices=("fp16", "bf16", "fp32"))
    p.add_argument("--methods", default=",".join(CHECK_METHODS), help=f"subset of {', '.join(CHECK_METHODS)}")
    p.add_argument("--batch_size", type=int, default=None, help="per rank (gpu: 32)")
    p.add_argument("--seq_len", type=int, default=None, help="gpu: 128")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per runner per round")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per runner before the first round")
    p.add_argument("--max_warm", type=int, default=None, help="cap on the build's steps waiting for a real step")
    p.add_argument("--epsilon", type=float, default=1e-2, help="adversarial ball radius (large enough for fp16)")
    p.add_argument("--step_size", type=float, default=None, help="ascent step (default: epsilon)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_plain", action="store_true", help="skip the plain-loop rows")
    p.add_argument("--allow_jit", action="store_true", help="let DeepSpeed JIT-compile ops (refused by default)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="start no further precision or phase after this many seconds (gpu: 330), so the call ends "
                        "in time")
    p.add_argument("--out_dir", default=os.environ.get("OUT") or "gpu_check_out")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated, run in this order: {', '.join(PHASES)}")  # fmt: skip
    args = p.parse_args(argv)
    args.mode = "cpu_smoke" if args.cpu_smoke else "gpu"
    for k, v in MODES[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.phases = [s.strip() for s in args.phases.replace(" ", ",").split(",") if s.strip()]
    if [s for s in args.phases if s not in PHASES] or not args.phases:
        p.error(f"--phases takes {', '.join(PHASES)}; got {args.phases}")
    bad = [m for m in args.methods if m not in CHECK_METHODS] + [q for q in args.precisions if q not in DTYPES]
    if bad:
        p.error(f"unknown methods or precisions {bad}")
    if "kd" not in args.methods:
        args.methods.insert(0, "kd")  # every ratio is to kd
    return args


def load_previous(path: str, mode: str):
    """What earlier phases of this check wrote to ``path`` (same mode), to add this process's phases to; else None."""
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return None
    return previous if previous.get("mode") == mode and "phases_run" in previous else None


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --cpu_smoke for the CPU run of the same path")
    from ad2_ds import dist

    ctx = setup(args)
    mem, log, student, shapes = ctx["mem"], ctx["log"], ctx["student"], SHAPES[args.mode]
    out_path = os.path.join(args.out_dir, "gpu_check.json")
    result = load_previous(out_path, args.mode) or {
        "mode": args.mode, "complete": False, "phases": {}, "skipped_phases": [], "errors": {}, "phases_run": {},
    }
    prior_wall, prior_memory = result.get("wall_s", 0.0), result.get("memory_mib", {})
    result.update({
        "complete": False,  # until the phases below have run (an earlier process may have written True)
        "command": "bash benchmarks/gpu_check.sh" if args.mode == "gpu" else "python benchmarks/gpu_check.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "environment": ctx["env"], "teacher": ctx["teacher_info"],
        "setup": {
            "student": {**dict(zip(("layers", "hidden", "heads", "ffn"), shapes["student"])), "attention": "sdpa "
                        "(ad2: its copy switched to the pre-dropout eager attention)",
                        "params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 1)},
            "vocab": 30522, "num_labels": 2, "weights": "random", "batch_size_per_rank": args.batch_size,
            "seq_len": args.seq_len, "world_size": ctx["world"], "rounds": args.rounds, "steps": args.steps,
            "warmup": args.warmup, "epsilon": args.epsilon, "step_size": args.step_size or args.epsilon,
            "methods": {m: METHODS[m][0] for m in args.methods}, "precisions": args.precisions,
            "timing": "wall time around each step, which ends with torch.cuda.synchronize(); median of timed steps",
            "memory_backend": mem.backend, "memory_unit": "MiB",
        },
    })

    def write():
        now = mem.high("run")  # this process's peaks; an earlier phase's process may have had higher ones
        result["memory_mib"] = {k: max((v for v in (now[k], prior_memory.get(k)) if v is not None), default=None)
                                for k in now}  # fmt: skip
        result["wall_s"] = round(prior_wall + time.perf_counter() - t_start, 1)
        if ctx["rank"] == 0:
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    for name in args.phases:
        PHASES[name].forget(result)
        PHASES[name].run(args, ctx, result, write, over_budget)
        result["phases_run"][name] = result["argv"]
    result["complete"] = set(result["phases_run"]) == set(PHASES) and not result["skipped_phases"] \
        and not result["errors"]  # fmt: skip
    write()
    summary = {p: {r["name"]: r["ratio_to_kd"] for r in ph["results"]} for p, ph in result["phases"].items()}
    log(json.dumps({"ratio_to_kd": summary, "wall_s": result["wall_s"], "json": out_path}))
    dist.clean_exit(0 if not result["errors"] else 1)


if __name__ == "__main__":
    main()
