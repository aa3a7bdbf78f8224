"""Whole-run cost of finished distill_glue runs, side by side: score, examples per epoch, and where the seconds went.

    python benchmarks/run_cost.py --ref ad2-dkd runs/eda-cost/movie-polarity/kd/lr0.0001-bs16/seed42 \\
        runs/eda-cost-eps1/movie-polarity/ad2-dkd/lr0.0001-bs16-eps1/seed42 \\
        runs/movie-eda4/movie-polarity/kd/*/seed* --json_out docs/results/quality/movie-polarity-eda-cost.json

Reads each RUN/results.json (written by recipes/distill_glue.py). A run's total is its training loop (evaluations
included) plus its setup phases: loading and augmenting the data, evaluating the teacher, building the engine, and
the teacher (building its cache when the run built one; 0 when it reused one). Ratios are to the first run whose
label starts with --ref, so compare runs made under the same load (timings on a shared machine mean nothing alone).
"""

import argparse
import json
import os


def label(results: dict) -> str:
    args, method = results["args"], results["method"]
    if args.get("augment_copies"):
        method += f" + EDA x{args['augment_copies']}"
    if results["config"].get("epsilon") not in (None, 1e-5) and method.startswith("ad2"):
        method += f" (eps {results['config']['epsilon']:g})"
    return method


def row(run_dir: str) -> dict:
    from ad2_ds.data.tasks import get_task

    with open(os.path.join(run_dir, "results.json")) as f:
        r = json.load(f)
    setup = r.get("setup_seconds", {})
    metric = get_task(r["task"]).main_metric  # the score the sweep ranks by (sms-spam's best also holds accuracy)
    return {
        "run": run_dir,
        "label": label(r),
        "seed": r["args"]["seed"],
        "metric": metric,
        "score": r["best"][metric],
        "train_examples": r.get("train_examples"),
        "train_seconds": r["train_seconds"],
        "setup_seconds": setup,
        "total_seconds": r["train_seconds"] + sum(setup.values()),
        "teacher": "live" if not r["args"].get("teacher_cache") else "cache",
        "zero_stage": r["engine"]["zero_stage"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="distill_glue output dirs")
    p.add_argument("--ref", help="label prefix of the reference run for the ratios (default: the first run)")
    p.add_argument("--json_out")
    args = p.parse_args(argv)
    missing = [d for d in args.runs if not os.path.isfile(os.path.join(d, "results.json"))]
    if missing:
        p.error(f"no results.json in {', '.join(missing)}: pass finished distill_glue output dirs")
    rows = [row(d) for d in args.runs]
    ref = next((r for r in rows if r["label"].startswith(args.ref or "")), rows[0])
    head = ("run", "seed", "score", "examples", "train s", "teacher s", "total s", "ratio")
    print(f"{head[0]:28s} " + " ".join(f"{h:>9s}" for h in head[1:]))
    for r in rows:
        r["total_ratio_to_ref"] = r["total_seconds"] / ref["total_seconds"]
        cells = (r["seed"], f"{r['score']:.4f}", r["train_examples"] or 0, f"{r['train_seconds']:.0f}",
                 f"{r['setup_seconds'].get('teacher', 0):.0f}", f"{r['total_seconds']:.0f}",
                 f"{r['total_ratio_to_ref']:.2f}")  # fmt: skip
        print(f"{r['label']:28s} " + " ".join(f"{c:>9}" for c in cells))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"reference": ref["run"], "runs": rows}, f, indent=1)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
