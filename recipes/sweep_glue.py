"""Run the paper's protocol: a grid (learning rate x micro batch [x epsilon]) x seeds x methods per task, pick each
(task, method)'s best configuration on the dev main metric (median over seeds), and report median and min-max.

    # the low-resource movie-polarity comparison of docs/RESULTS.md (one config, 3 seeds, 6 methods; 1 CPU rank)
    python recipes/sweep_glue.py --sweep_dir runs/sweep-movie --deepspeed ds_configs/zero2.json \\
        --tasks movie-polarity --methods finetune kd pkd ad2 ad2-dkd ad2-kd --seeds 42 43 44 \\
        --learning_rates 1e-4 --batch_sizes 16 --delete_checkpoints \\
        --teacher ~/.cache/ad2_ds/teachers/movie-polarity-all-MiniLM-L6-v2-n2000-len64-e3-s42 --no_progress

    # the paper's Table 1 on real GLUE (GPU cluster; teachers fine-tuned first with recipes/finetune_teacher.py,
    # one per task, under teachers/<task>/best). Every run goes through the deepspeed launcher:
    python recipes/sweep_glue.py --sweep_dir runs/table1 --deepspeed ds_configs/zero2_fp16.json \\
        --launcher "deepspeed --num_gpus 8" --tasks cola sst2 mrpc stsb qqp mnli qnli rte \\
        --teacher_template "teachers/{task}/best" --methods finetune kd pkd ad2 \\
        --learning_rates 2e-5 3e-5 5e-5 --batch_sizes 16 32 --seeds 42 43 44 45 46 --delete_checkpoints \\
        --data_dir glue_data --student_layers skip:6 --max_train_samples 0 --epsilon 1e-5 --teacher_dtype fp16

(the grid values above are an example: use the grid your paper or budget gives; with fp16 read the README's note on
epsilon. To grid over the radius, ``--epsilons 1e-5 1e-3 0.1 --step_size_ratio 1`` gives each run η = ε, so its one
PGA step reaches the ball's surface.)

Any flag this script does not know is passed to every run of ``recipes/distill_glue.py`` unchanged
(``--teacher --student_layers --epsilon --max_train_samples --num_train_epochs --w_attention --layer_map ...``); the
ones the sweep owns (``--task --method --seed --output_dir --deepspeed``) are refused there.

Layout: ``SWEEP_DIR/ds_configs/lr{lr}-bs{bs}.json`` (the base DeepSpeed JSON with the optimizer lr, the scheduler's
max lr and the micro batch replaced), ``SWEEP_DIR/{task}/{method}/{config}/seed{seed}/`` (one distill_glue run each,
with its ``results.json`` and ``log.txt``), ``SWEEP_DIR/summary.json`` and ``SWEEP_DIR/summary.md``.
A run whose ``results.json`` exists is skipped, so re-running the same command resumes the sweep; a run killed after
a checkpoint is continued with ``--resume``. ``--teacher_cache DIR`` gives every run that needs no attention maps a
teacher cache under ``DIR/{task}/{method}`` (built by the first seed, reused by the rest; pass-through flags, which
may change the data or the layers cached, add a hash of themselves: ``{method}-{hash}``); attention-KD and mixup
runs run the teacher live (a cache holds no attention maps, nor the teacher on new mixed points). ``--collect_only``
only rewrites the summary from the runs on disk.
"""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from ad2_ds.cli import config_from_args, run_parser
from ad2_ds.flags import teacher_neutral_flags
from ad2_ds.run import RunConfig

RECIPES = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(RECIPES)

OWNED = ("--task", "--method", "--seed", "--output_dir", "--deepspeed", "--deepspeed_config", "--teacher_cache")
# Run flags that cannot change what a teacher cache holds (flag -> how many values follow it), from RunConfig's field
# metadata: they do not give a run its own cache. Any other pass-through flag does (the cache's fingerprint would
# refuse a mismatch).
CACHE_NEUTRAL = teacher_neutral_flags(RunConfig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # "--seed" must not become "--seeds": unknown flags belong to distill_glue
    )
    p.add_argument("--sweep_dir", required=True)
    p.add_argument("--deepspeed", required=True, metavar="PATH", help="base DeepSpeed JSON the grid is derived from")
    p.add_argument("--tasks", nargs="+", default=["movie-polarity"])
    p.add_argument("--methods", nargs="+", default=["kd", "ad2"])
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    p.add_argument("--learning_rates", nargs="+", type=float, default=[1e-4])
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[16], help="micro batch per GPU")
    p.add_argument(
        "--epsilons", nargs="+", type=float, help="also grid over epsilon (default: one value, from the pass-through)"
    )
    p.add_argument(
        "--step_size_ratio",
        type=float,
        metavar="R",
        help="with --epsilons: each run's PGA step size is R x its epsilon (R = 1/K lets K steps reach the ball's "
        "surface; a fixed --step_size caps |delta| at K x step_size whatever epsilon is)",
    )
    p.add_argument(
        "--teacher_template", help="per-task teacher, e.g. 'teachers/{task}/best' (instead of one --teacher)"
    )
    p.add_argument("--teacher_cache", metavar="DIR", help="root of per-(task, method) teacher caches")
    p.add_argument(
        "--launcher",
        help="run each job as LAUNCHER recipes/distill_glue.py ARGS (e.g. 'deepspeed --num_gpus 8'); "
        "default: python recipes/distill_glue.py ARGS (one process)",
    )
    p.add_argument(
        "--csv_monitor",
        action="store_true",
        help="each run gets its own DeepSpeed JSON with DeepSpeed's CSV monitor on: per-step train losses under "
        "RUN/monitor/, summarised (first and last 50 steps) in summary.json",
    )
    p.add_argument("--delete_checkpoints", action="store_true", help="remove checkpoints/ and best/ after each run")
    p.add_argument("--fail_fast", action="store_true", help="stop at the first failed run")
    p.add_argument("--dry_run", action="store_true", help="print the runs, run nothing")
    p.add_argument("--collect_only", action="store_true", help="only rewrite the summary from the runs on disk")
    args, passthrough = p.parse_known_args(argv)
    for flag in passthrough:
        if flag.split("=")[0] in OWNED:
            p.error(f"{flag} is set by the sweep; use --tasks/--methods/--seeds/--sweep_dir/--deepspeed")
    if args.teacher_template and any(f.split("=")[0] == "--teacher" for f in passthrough):
        p.error("pass --teacher or --teacher_template, not both")
    if args.step_size_ratio is not None:
        if not args.epsilons:
            p.error("--step_size_ratio scales each grid epsilon: give --epsilons too")
        if args.step_size_ratio <= 0:
            p.error(f"--step_size_ratio must be > 0, got {args.step_size_ratio:g}")
        if any(f.split("=")[0] == "--step_size" for f in passthrough):
            p.error("pass --step_size or --step_size_ratio, not both")
    return args, passthrough


def _num(x) -> str:
    return f"{x:g}"


def config_name(lr, bs, eps) -> str:
    return f"lr{_num(lr)}-bs{bs}" + ("" if eps is None else f"-eps{_num(eps)}")


def write_ds_config(base_path, sweep_dir, lr, bs) -> str:
    """The base JSON with this grid point's lr (optimizer and scheduler peak) and micro batch size."""
    with open(base_path) as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = bs
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world size
    cfg.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = lr
    sched = cfg.get("scheduler", {}).get("params", {})
    for key in ("warmup_max_lr", "max_lr", "cycle_max_lr"):
        if key in sched:
            sched[key] = lr
    path = os.path.join(sweep_dir, "ds_configs", f"lr{_num(lr)}-bs{bs}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, path)
    return path


def plan(args, passthrough):
    """Every run, in the order they go: task, seed, grid point, method (a cut-short sweep has all methods for the
    seeds it reached)."""
    epsilons = args.epsilons or [None]
    tag = cache_tag(passthrough)
    runs = []
    for task in args.tasks:
        for seed in args.seeds:
            for lr in args.learning_rates:
                for bs in args.batch_sizes:
                    for eps in epsilons:
                        for method in args.methods:
                            cname = config_name(lr, bs, eps)
                            out = os.path.join(args.sweep_dir, task, method, cname, f"seed{seed}")
                            argv = [
                                "--task", task, "--method", method, "--seed", str(seed), "--output_dir", out,
                                "--deepspeed", os.path.join(args.sweep_dir, "ds_configs", f"lr{_num(lr)}-bs{bs}.json"),
                            ]  # fmt: skip
                            if args.teacher_template:
                                argv += ["--teacher", args.teacher_template.format(task=task)]
                            if eps is not None:
                                argv += ["--epsilon", str(eps)]
                                if args.step_size_ratio is not None:
                                    argv += ["--step_size", str(args.step_size_ratio * eps)]
                            argv += passthrough
                            runs.append(dict(task=task, method=method, config=cname, seed=seed, lr=lr, bs=bs,
                                             epsilon=eps, out=out, argv=argv, cache=method + tag))  # fmt: skip
    return runs


def cache_tag(passthrough) -> str:
    """ "" when the pass-through flags leave the teacher's inputs as they are, else "-" + a hash of those that do."""
    kept, i = [], 0
    while i < len(passthrough):
        flag = passthrough[i].split("=")[0]
        if flag in CACHE_NEUTRAL:
            i += 1 + (CACHE_NEUTRAL[flag] if "=" not in passthrough[i] else 0)
        else:
            kept.append(passthrough[i])
            i += 1
    return "-" + hashlib.sha1(" ".join(kept).encode()).hexdigest()[:8] if kept else ""


def teacher_cacheable(argv) -> bool:
    """Whether a teacher cache can serve the run (no attention maps, no mixup): its resolved objective, parsed exactly
    as distill_glue parses it (bad pass-through flags fail here)."""
    return config_from_args(run_parser(__doc__).parse_args(argv)).objective.teacher_cacheable


def command(args, argv):
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    return launcher + [os.path.join(RECIPES, "distill_glue.py")] + argv


def execute(args, run) -> dict:
    """One run in its own process and output dir; returns how it went."""
    out, argv = run["out"], list(run["argv"])
    if os.path.isfile(os.path.join(out, "results.json")):
        return {"status": "done before"}
    if os.path.isfile(os.path.join(out, "checkpoints", "latest")):
        argv.append("--resume")
    elif os.path.isdir(out):
        argv.append("--overwrite_output_dir")  # a run killed before its first checkpoint
    if args.teacher_cache and teacher_cacheable(run["argv"]):
        argv += ["--teacher_cache", os.path.join(args.teacher_cache, run["task"], run["cache"])]
    os.makedirs(out, exist_ok=True)
    if args.csv_monitor:
        with open(argv[argv.index("--deepspeed") + 1]) as f:
            ds = json.load(f)
        ds["csv_monitor"] = {"enabled": True, "output_path": os.path.abspath(out), "job_name": "monitor"}
        argv[argv.index("--deepspeed") + 1] = path = os.path.join(out, "ds_config.json")
        with open(path, "w") as f:
            json.dump(ds, f, indent=2)
    env = dict(os.environ)
    # Each run is its own job: a rendezvous left in this process's environment (RANK, MASTER_PORT, ... from a launcher
    # or an in-process run) would make it join a stale group or bind a port in use.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    start = time.time()
    with open(os.path.join(out, "log.txt"), "a") as log:
        log.write("$ " + shlex.join(command(args, argv)) + "\n")
        log.flush()
        rc = subprocess.call(command(args, argv), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc == 0 and args.delete_checkpoints:
        for name in ("checkpoints", "best"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    return {"status": "ok" if rc == 0 else f"failed (exit {rc}, see {out}/log.txt)", "seconds": time.time() - start}


def monitored_losses(out, n=50):
    """Mean of each train loss term over the first and the last n optimizer steps, from the CSV monitor (or None)."""
    from ad2_ds.utils import read_monitor_csv

    folder = os.path.join(out, "monitor")
    if not os.path.isdir(folder):
        return None
    losses = {}
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("train_") and name.endswith(".csv")):
            continue
        values = [v for _, v in read_monitor_csv(os.path.join(folder, name))]
        if values:
            losses[name[len("train_") : -len(".csv")]] = {
                "first": statistics.fmean(values[:n]), "last": statistics.fmean(values[-n:]), "steps": len(values)
            }  # fmt: skip
    return losses or None


def collect(args, runs) -> dict:
    """Per (task, method): every configuration's per-seed scores, and the best configuration by median."""
    from ad2_ds.data.tasks import get_task

    summary = {"sweep_dir": args.sweep_dir, "tasks": {}}
    for task in args.tasks:
        metric = get_task(task).main_metric
        entry = {"main_metric": metric, "teacher": None, "methods": {}}
        for method in args.methods:
            configs = {}
            for run in (r for r in runs if r["task"] == task and r["method"] == method):
                path = os.path.join(run["out"], "results.json")
                if not os.path.isfile(path):
                    continue
                with open(path) as f:
                    res = json.load(f)
                t_score = res.get("teacher_scores", {}).get(metric)
                if t_score is not None:
                    entry["teacher"] = t_score
                c = configs.setdefault(
                    run["config"], {"config": run["config"], "lr": run["lr"], "batch_size": run["bs"],
                                    "epsilon": res["config"]["epsilon"], "runs": []}
                )  # fmt: skip
                c["runs"].append({
                    "seed": run["seed"], "score": res["best"].get(metric), "best": res["best"],
                    "train_seconds": res.get("train_seconds"), "samples_per_second": res.get("samples_per_second"),
                    "train_losses": monitored_losses(run["out"]),
                })  # fmt: skip
            for c in configs.values():
                scores = [r["score"] for r in c["runs"] if r["score"] is not None]
                c.update(n=len(scores), median=statistics.median(scores) if scores else None,
                         min=min(scores, default=None), max=max(scores, default=None))  # fmt: skip
            ranked = sorted((c for c in configs.values() if c["median"] is not None), key=lambda c: -c["median"])
            entry["methods"][method] = {"best": ranked[0] if ranked else None, "configs": list(configs.values())}
        summary["tasks"][task] = entry
    return summary


def markdown(summary, seeds) -> str:
    lines = []
    for task, entry in summary["tasks"].items():
        metric, t = entry["main_metric"], entry["teacher"]
        lines += [f"### {task} (dev {metric}; median [min-max] over seeds {', '.join(map(str, seeds))})", ""]
        lines += ["| method | best config | median | [min-max] | seeds | % of teacher |", "|---|---|---|---|---|---|"]
        if t is not None:
            lines.append(f"| teacher | - | {t:.4f} | - | - | 100.0 |")
        for method, m in entry["methods"].items():
            b = m["best"]
            if b is None:
                lines.append(f"| {method} | - | not run | - | 0 | - |")
                continue
            pct = "-" if not t else f"{100 * b['median'] / t:.1f}"
            spread = f"[{b['min']:.4f}-{b['max']:.4f}]"
            lines.append(f"| {method} | {b['config']} | {b['median']:.4f} | {spread} | {b['n']} | {pct} |")
        if any(len(m["configs"]) > 1 for m in entry["methods"].values()):
            lines += ["", "All configurations:", "", "| method | config | median | [min-max] | seeds |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for method, m in entry["methods"].items():
                for c in m["configs"]:
                    if c["median"] is not None:
                        lines.append(
                            f"| {method} | {c['config']} | {c['median']:.4f} | [{c['min']:.4f}-{c['max']:.4f}] "
                            f"| {c['n']} |"
                        )
        lines.append("")
    return "\n".join(lines)


def write_summary(args, runs):
    summary = collect(args, runs)
    summary["command"] = shlex.join([sys.executable, os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    os.makedirs(args.sweep_dir, exist_ok=True)
    with open(os.path.join(args.sweep_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = markdown(summary, args.seeds)
    with open(os.path.join(args.sweep_dir, "summary.md"), "w") as f:
        f.write(table)
    return table


def main(argv=None) -> int:
    args, passthrough = parse_args(argv)
    for lr in args.learning_rates:
        for bs in args.batch_sizes:
            write_ds_config(args.deepspeed, args.sweep_dir, lr, bs)
    runs = plan(args, passthrough)
    if not args.collect_only:
        try:
            teacher_cacheable(runs[0]["argv"])  # a bad pass-through flag fails before anything runs
        except (SystemExit, ValueError) as e:
            print(f"error: the runs' flags do not parse ({e or 'see above'})", file=sys.stderr)
            return 2
        failed = 0
        for i, run in enumerate(runs, 1):
            label = f"[{i}/{len(runs)}] {run['task']} {run['method']} {run['config']} seed {run['seed']}"
            if args.dry_run:
                print(label + ": " + shlex.join(command(args, run["argv"])))
                continue
            print(label + " ...", flush=True)
            outcome = execute(args, run)
            took = f" in {outcome['seconds']:.0f} s" if "seconds" in outcome else ""
            print(f"{label}: {outcome['status']}{took}", flush=True)
            if outcome["status"].startswith("failed"):
                failed += 1
                if args.fail_fast:
                    break
            write_summary(args, runs)  # after every run: a cut-short sweep still has its table
        if args.dry_run:
            return 0
    print(write_summary(args, runs))
    return 0 if args.collect_only or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
