"""Choose AD²'s perturbation on dev: a few settings x the offline tasks, one distill_glue run each, one at a time.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ad2_selection.py --out_dir runs/ad2-selection --seed 42 \\
        --json_out docs/results/quality/ad2-selection.json

Each setting is a list of distill_glue flags (``SETTINGS``; ``--settings`` picks some, in order). The runs go
setting-major (every task of one setting before the next, so a sweep stopped early leaves whole rows) or, with
``--task_major``, task by task (whole columns: on a loaded machine, one task's comparison complete first). A run whose
``results.json`` exists is skipped, so re-running resumes. Every run of a task shares one teacher cache
(logits only: every setting here uses deep-KD weight 0). The summary reads each run's best dev score (the task's main
metric) and whole-run cost, and gives per setting: the score minus kd's and minus the ε = 0 control's on each task,
and the median over tasks of (setting − kd), the issue's selection rule. Dev selects; nothing here reads test.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("movie-polarity", "trec", "sms-spam", "movie-valence")
_DKD0 = ["--method", "ad2-dkd"]  # ce + kd + α·ada, deep-KD weight 0
SETTINGS = {
    "kd": ["--method", "kd"],
    "eps0": _DKD0 + ["--epsilon", "0"],
    "tok-l2-rel0.02": _DKD0 + ["--perturb_norm", "token-l2", "--perturb_size", "relative"]
    + ["--epsilon", "0.02", "--step_size", "0.02"],
    "tok-l2-rel0.05": _DKD0 + ["--perturb_norm", "token-l2", "--perturb_size", "relative"]
    + ["--epsilon", "0.05", "--step_size", "0.05"],
    "tok-l2-rel0.05-random": _DKD0 + ["--perturb_norm", "token-l2", "--perturb_size", "relative"]
    + ["--epsilon", "0.05", "--step_size", "0.05", "--random_direction"],
    "ex-l2-abs1": _DKD0 + ["--epsilon", "1", "--step_size", "1"],
    "smart": ["--method", "ad2-smart", "--w_hidden", "0", "--w_attention", "0"],
    "tok-l2-rel0.2": _DKD0 + ["--perturb_norm", "token-l2", "--perturb_size", "relative"]
    + ["--epsilon", "0.2", "--step_size", "0.2"],
    "tok-linf-rel0.05-preln": _DKD0 + ["--perturb_norm", "token-linf", "--perturb_size", "relative"]
    + ["--perturb_place", "pre-ln", "--epsilon", "0.05", "--step_size", "0.05"],
}  # fmt: skip


def run_dir(out_dir: str, task: str, setting: str, seed: int) -> str:
    return os.path.join(out_dir, task, setting, f"seed{seed}")


def run_one(args, task: str, setting: str) -> int:
    out = run_dir(args.out_dir, task, setting, args.seed)
    if os.path.isfile(os.path.join(out, "results.json")):
        return 0
    argv = [sys.executable, os.path.join(ROOT, "recipes", "distill_glue.py"), "--deepspeed", args.deepspeed]
    argv += ["--task", task, "--seed", str(args.seed), "--output_dir", out, "--overwrite_output_dir", "--no_progress"]
    argv += ["--teacher_cache", os.path.join(args.out_dir, "cache", task), *SETTINGS[setting]]
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(out, "log.txt"), "w") as log:
        rc = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"{task} {setting}: rc {rc}, {time.time() - t0:.0f} s", flush=True)
    if rc == 0:
        for name in ("best", "checkpoints"):  # keep results.json and the log only
            subprocess.call(["rm", "-rf", os.path.join(out, name)])
    return rc


def read_run(path: str) -> dict:
    from ad2_ds.data.tasks import get_task

    with open(os.path.join(path, "results.json")) as f:
        r = json.load(f)
    metric = get_task(r["task"]).main_metric
    setup = r.get("setup_seconds", {})
    return {
        "metric": metric,
        "dev": r["best"][metric],
        "teacher_dev": (r.get("teacher_scores") or {}).get(metric),
        "train_seconds": round(r["train_seconds"], 1),
        "total_seconds": round(r["train_seconds"] + sum(setup.values()), 1),
        "config": {k: r["config"][k] for k in ("method", "epsilon", "step_size", "pga_steps", "perturbation")}
        | {k: r["config"].get(k) for k in ("perturb_norm", "perturb_size", "perturb_place", "random_direction")},
    }


def summarise(scores: dict) -> dict:
    """scores: {setting: {task: dev score}} -> per setting: minus kd and minus eps0 per task, and the medians over the
    tasks that have both (points: scores x 100)."""
    out = {}
    for setting, by_task in scores.items():
        row = {"dev": by_task}
        for ref in ("kd", "eps0"):
            common = [t for t in by_task if t in scores.get(ref, {})]
            diff = {t: round(100 * (by_task[t] - scores[ref][t]), 2) for t in common}
            row[f"minus_{ref}"] = diff
            row[f"median_minus_{ref}"] = round(statistics.median(diff.values()), 2) if diff else None
        out[setting] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", default="runs/ad2-selection")
    p.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "zero2.json"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--task_major", action="store_true", help="run every setting of a task before the next task")
    p.add_argument("--collect_only", action="store_true")
    p.add_argument("--json_out")
    args = p.parse_args(argv)
    failed = []
    if not args.collect_only:
        order = [(t, s) for s in args.settings for t in args.tasks]
        if args.task_major:
            order = [(t, s) for t in args.tasks for s in args.settings]
        for task, setting in order:
            if run_one(args, task, setting):
                failed.append(f"{task}/{setting}")
    runs, scores = {}, {}
    for setting in args.settings:
        for task in args.tasks:
            path = run_dir(args.out_dir, task, setting, args.seed)
            if os.path.isfile(os.path.join(path, "results.json")):
                runs.setdefault(setting, {})[task] = read_run(path)
                scores.setdefault(setting, {})[task] = runs[setting][task]["dev"]
    summary = summarise(scores)
    for setting, row in summary.items():
        dev = " ".join(f"{t}={100 * v:.2f}" for t, v in row["dev"].items())
        print(f"{setting:<24} {dev}  median-kd {row['median_minus_kd']}  median-eps0 {row['median_minus_eps0']}")
    if args.json_out:
        result = {
            "command": "PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ad2_selection.py "
            + " ".join(argv or sys.argv[1:]),
            "split": "dev (best evaluation of each run; selection only)",
            "seed": args.seed,
            "settings": {s: SETTINGS[s] for s in args.settings},
            "runs": runs,
            "summary": summary,
            "failed": failed,
        }
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
