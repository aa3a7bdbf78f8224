"""Several teachers against one (issue 21, item 6): per task and seed, kd and the default ad2 distilled from each
single member and from their ensemble, read on test.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ensemble.py --out_dir runs/ensemble --tasks movie-polarity trec \
        --seeds 42 43 44 --json_out docs/results/quality/ensemble.json --markdown_out docs/results/quality/ensemble.md

A teacher setting (``TEACHERS``) is a list of members, each a packaged base model fine-tuned here once per task with
its own ``--teacher_seed`` (``ad2_ds.default_teacher``: the same cache as any run's). ``minilm-s42`` is the default
teacher every other table uses; ``minilm-s43`` the same base fine-tuned with seed 43; ``minilm-s42+s43`` both, equal
weights (the mean of their probabilities). Each member's outputs are cached once per task in its own folder
(``out_dir/cache/<task>-<model>-s<seed>``), shared by the single and the ensemble runs (a member's cache is keyed as
if it ran alone). The student is cut from the first member (``--student_layers`` default), so ``minilm-s43``'s student
starts from other weights than the other two settings'.

"Best single member" is chosen on dev: the single-member setting whose teacher has the higher dev score on the task
(never on test). The table gives per setting, method and task the student's test score (median [min-max] over seeds),
the teacher's (the ensemble's for an ensemble) test score, the difference to the best single member's student with
the same method, and the median whole-run seconds. Runs whose ``results.json`` exists are skipped (re-running
resumes); ``--merge_json`` reads runs recorded elsewhere: this script's own ``--json_out``, or an
``benchmarks/ad2_selection.py`` JSON of the default teacher, whose ``kd`` and ``ex-l2-abs1`` runs (``ex-l2-abs1`` is
``--method ad2``, config.py) are ``minilm-s42``'s. A run directory here wins.
"""

import argparse
import json
import os
import statistics
import sys

from benchmarks.ad2_selection import ROOT, _cell, read_run, run_recipe

MINILM, MPNET = "all-MiniLM-L6-v2", "all-mpnet-base-v2"
TEACHERS = {  # setting: [(base model, teacher seed), ...]
    "minilm-s42": [(MINILM, 42)],
    "minilm-s43": [(MINILM, 43)],
    "minilm-s42+s43": [(MINILM, 42), (MINILM, 43)],
}
METHODS = {"kd": ["--method", "kd"], "ad2": ["--method", "ad2"]}
# ad2_selection.py settings of the default teacher that are one of ours (same flags, same teacher)
BORROWED = {"kd": ("minilm-s42", "kd"), "ex-l2-abs1": ("minilm-s42", "ad2")}


def singles(settings) -> list:
    return [s for s in settings if len(TEACHERS[s]) == 1]


def teacher_flags(out_dir: str, task: str, setting: str) -> list:
    """--teacher per member, their seeds and each member's own cache folder."""
    members = TEACHERS[setting]
    flags = []
    for model, _ in members:
        flags += ["--teacher", model]
    caches = [os.path.join(out_dir, "cache", f"{task}-{model}-s{seed}") for model, seed in members]
    return flags + ["--teacher_seed", ",".join(str(s) for _, s in members), "--teacher_cache", ",".join(caches)]


def run_dir(out_dir: str, task: str, setting: str, method: str, seed: int) -> str:
    return os.path.join(out_dir, task, setting, method, f"seed{seed}")


def run_one(args, task: str, setting: str, method: str, seed: int) -> int:
    out = run_dir(args.out_dir, task, setting, method, seed)
    flags = METHODS[method] + teacher_flags(args.out_dir, task, setting)
    return run_recipe(out, args.deepspeed, task, seed, flags, f"{task} {setting} {method} seed {seed}")


def read(path: str) -> dict:
    """read_run's fields plus the teacher's (the ensemble's) test score and each member's dev and test scores."""
    run = read_run(path)
    with open(os.path.join(path, "results.json")) as f:
        r = json.load(f)
    metric = run["metric"]
    run["teacher_test"] = (r.get("teacher_test") or {}).get(metric)
    run["members"] = [
        {"teacher": m.get("path") or m["teacher"], "weight": m.get("weight"),
         "dev": (m.get("teacher_scores") or {}).get(metric), "test": (m.get("teacher_test") or {}).get(metric),
         "train_seconds": m.get("train_seconds")}
        for m in r.get("teacher_members", [])
    ]  # fmt: skip
    return run


def recorded_runs(paths) -> dict:
    """{(setting, method, task, seed): run} from earlier JSON files (this script's, or ad2_selection.py's of the
    default teacher through ``BORROWED``); the first file that has a run gives it."""
    out = {}
    for path in paths:
        with open(path) as f:
            earlier = json.load(f)
        name = os.path.basename(path)
        if "settings" in earlier:  # ad2_selection.py: {setting: {task: [runs]}}
            if earlier.get("model_flags"):
                continue  # another teacher than the default
            for theirs, (setting, method) in BORROWED.items():
                for task, rs in earlier.get("runs", {}).get(theirs, {}).items():
                    for r in rs:
                        out.setdefault((setting, method, task, r["seed"]), {"recorded_in": name} | r)
            continue
        for setting, by_method in earlier.get("runs", {}).items():
            for method, by_task in by_method.items():
                for task, rs in by_task.items():
                    for r in rs:
                        out.setdefault((setting, method, task, r["seed"]), {"recorded_in": r.get("recorded_in", name)}
                                       | r)  # fmt: skip
    return out


def collect(args) -> dict:
    """{setting: {method: {task: [run per seed]}}}: a run directory here, else a recorded run."""
    recorded = recorded_runs(args.merge_json)
    runs = {}
    for setting in args.settings:
        for method in args.methods:
            for task in args.tasks:
                for seed in args.seeds:
                    path = run_dir(args.out_dir, task, setting, method, seed)
                    if os.path.isfile(os.path.join(path, "results.json")):
                        run = read(path) | {"seed": seed}
                    elif (setting, method, task, seed) in recorded:
                        run = recorded[setting, method, task, seed]
                    else:
                        continue
                    runs.setdefault(setting, {}).setdefault(method, {}).setdefault(task, []).append(run)
    return runs


def _first(runs: list, key: str):
    return next((r[key] for r in runs if r.get(key) is not None), None)


def best_single(runs: dict, settings, task: str):
    """The single-member setting whose teacher scores highest on dev for ``task`` (ties: the earlier one)."""
    best, best_dev = None, None
    for s in singles(settings):
        dev = _first([r for rs in runs.get(s, {}).values() for r in rs.get(task, [])], "teacher_dev")
        if dev is not None and (best_dev is None or dev > best_dev):
            best, best_dev = s, dev
    return best


def table(runs: dict, settings, methods, tasks) -> dict:
    """Per task: the best single member (on dev), and per setting and method the student's test cell (points), the
    teacher's test score, minus the best single member's student (median minus median), median whole-run seconds."""
    out = {}
    for task in tasks:
        best = best_single(runs, settings, task)
        rows = {}
        for setting in settings:
            for method in methods:
                mine = [r for r in runs.get(setting, {}).get(method, {}).get(task, []) if r.get("test") is not None]
                if not mine:
                    continue
                teacher_runs = [r for rs in runs[setting].values() for r in rs.get(task, [])]
                t_test = _first(teacher_runs, "teacher_test")
                cell = _cell([100 * r["test"] for r in mine]) | {
                    "teacher_test": None if t_test is None else round(100 * t_test, 2),
                    "teacher_dev": _first(teacher_runs, "teacher_dev"),
                    "total_seconds": round(statistics.median(r["total_seconds"] for r in mine), 1),
                    "minus_best_single": None,
                }
                ref = [
                    r["test"] for r in runs.get(best, {}).get(method, {}).get(task, []) if r.get("test") is not None
                ]
                if ref and setting != best:
                    cell["minus_best_single"] = round(cell["test"] - 100 * statistics.median(ref), 2)
                rows[f"{setting}/{method}"] = cell
        out[task] = {"best_single": best, "rows": rows}
    return out


def markdown(tab: dict, metrics: dict) -> str:
    lines = []
    for task, t in tab.items():
        lines += [
            f"{task} ({metrics[task]}; best single member on dev: `{t['best_single']}`):",
            "",
            "| teacher / method | teacher test | student test | Δ best single | s |",
            "|---|--:|--:|--:|--:|",
        ]
        for name, c in t["rows"].items():
            d = "" if c["minus_best_single"] is None else f"{c['minus_best_single'] + 0:+.2f}"  # + 0: no -0.00
            teacher = "–" if c["teacher_test"] is None else f"{c['teacher_test']:.2f}"
            spread = f"{c['test']:.2f} [{c['min']:.2f}-{c['max']:.2f}] n{c['n']}"
            lines.append(f"| {name} | {teacher} | {spread} | {d} | {c['total_seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", default="runs/ensemble")
    p.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "zero2.json"))
    p.add_argument("--tasks", nargs="+", default=["movie-polarity", "trec"])
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    p.add_argument("--settings", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--collect_only", action="store_true")
    p.add_argument("--merge_json", nargs="+", default=[], metavar="JSON",
                   help="earlier --json_out files (or ad2_selection.py's of the default teacher): their runs count "
                   "where this --out_dir has none, and are not run again")  # fmt: skip
    p.add_argument("--json_out")
    p.add_argument("--markdown_out")
    args = p.parse_args(argv)
    failed = []
    if not args.collect_only:
        recorded = recorded_runs(args.merge_json)
        for seed in args.seeds:
            for task in args.tasks:
                for setting in args.settings:
                    for method in args.methods:
                        if (setting, method, task, seed) in recorded:
                            continue
                        if run_one(args, task, setting, method, seed):
                            failed.append(f"{task}/{setting}/{method}/seed{seed}")
    runs = collect(args)
    tab = table(runs, args.settings, args.methods, args.tasks)
    from ad2_ds.data.tasks import get_task

    metrics = {t: get_task(t).main_metric for t in args.tasks}
    text = markdown(tab, metrics)
    print(text)
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(text)
    if args.json_out:
        result = {
            "command": "PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ensemble.py "
            + " ".join(argv or sys.argv[1:]),
            "split": "test; the best single member is chosen on the teachers' dev scores",
            "seeds": args.seeds,
            "teachers": {s: TEACHERS[s] for s in args.settings},
            "methods": {m: METHODS[m] for m in args.methods},
            "runs": runs,
            "table": tab,
            "failed": failed,
        }
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
