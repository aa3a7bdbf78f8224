"""The plots of docs/RESULTS.md, from the JSON results the benchmarks and sweeps write (needs matplotlib).

    # dev score per method with its seed spread, from sweep summaries (recipes/sweep_glue.py's summary.json)
    python benchmarks/plot_results.py docs/results/quality/movie-polarity.json \\
        "docs/results/quality/movie-polarity-ad2-noatt.json= (w_attention 0)" --out docs/results/quality_movie.png
    # step cost per method as a ratio to KD, from benchmarks/step_cost.py's JSON
    python benchmarks/plot_results.py --cost docs/results/step_cost.json --out docs/results/step_cost.png
    # learning curves: gather the sweep's per-step CSV monitor logs into one JSON, then plot it
    python benchmarks/plot_results.py --curves runs/quality-movie/movie-polarity \\
        --curves_json docs/results/quality/curves_movie-polarity.json --out docs/results/learning_curves_movie.png
    python benchmarks/plot_results.py --curves docs/results/quality/curves_movie-polarity.json --out ...

Quality: each argument is a summary.json, optionally followed by ``=SUFFIX`` appended to its method names (to tell
variant sweeps apart). Per method (its best configuration): every seed as a dot, the median as a diamond, min-max as
a line; the teacher as a dashed line. Cost: one bar per method (median ms/step / kd's), the per-round min-max as an
error bar, and the pass arithmetic (units / kd's units) as a marker. Curves: per method, the hard-label loss (the one
term every method has) smoothed over 25 steps and the epoch-end dev score, median over seeds.
"""

import argparse
import glob
import json
import os
import statistics


def rows_from(path, suffix=""):
    with open(path) as f:
        summary = json.load(f)
    for task, entry in summary["tasks"].items():
        for method, m in entry["methods"].items():
            best = m["best"]
            if best is None:
                continue
            scores = [r["score"] for r in best["runs"] if r["score"] is not None]
            yield task, entry["main_metric"], entry["teacher"], method + suffix, best["median"], scores


def gather_curves(task_dir) -> dict:
    """{method: {seed: {"train_ce": [[samples, value], ...], "eval": [[samples, score], ...]}}} from the CSV monitor
    files of every run under ``SWEEP/TASK/METHOD/CONFIG/seedN/monitor`` (one config per method expected)."""
    from ad2_ds.utils import read_monitor_csv

    curves = {}
    for mon in sorted(glob.glob(os.path.join(task_dir, "*", "*", "seed*", "monitor"))):
        run = os.path.dirname(mon)
        if not os.path.isfile(os.path.join(run, "results.json")):
            continue  # still running (or died): a partial curve would cut every seed's median short
        method = os.path.basename(os.path.dirname(os.path.dirname(run)))
        evals = glob.glob(os.path.join(mon, "eval_*.csv"))
        ce = os.path.join(mon, "train_ce.csv")
        if not evals or not os.path.isfile(ce):
            continue
        curves.setdefault(method, {})[os.path.basename(run)] = {
            "train_ce": read_monitor_csv(ce),
            "eval": read_monitor_csv(sorted(evals)[0]),
            "eval_metric": os.path.basename(sorted(evals)[0])[5:-4],
        }
    if not curves:
        raise SystemExit(f"no runs with monitor/train_ce.csv under {task_dir}: run the sweep with --csv_monitor")
    return curves


def _smooth(values, n=25):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - n] if i >= n else 0.0)
        out.append(acc / min(i + 1, n))
    return out


def plot_curves(curves, out, plt):
    fig, (ax_l, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (method, seeds) in zip(colors * 3, sorted(curves.items())):
        runs = list(seeds.values())
        n = min(len(r["train_ce"]) for r in runs)
        xs = [x for x, _ in runs[0]["train_ce"][:n]]
        med = [statistics.median(r["train_ce"][i][1] for r in runs) for i in range(n)]
        ax_l.plot(xs, _smooth(med), color=color, lw=1.2, label=f"{method} (n={len(runs)})")
        m = min(len(r["eval"]) for r in runs)
        ex = [x for x, _ in runs[0]["eval"][:m]]
        ax_e.plot(ex, [statistics.median(r["eval"][i][1] for r in runs) for i in range(m)], "o-", color=color,
                  label=method)  # fmt: skip
    ax_l.set(xlabel="training samples seen", ylabel="hard-label CE (25-step mean, median over seeds)")
    metric = next(iter(next(iter(curves.values())).values()))["eval_metric"]
    ax_e.set(xlabel="training samples seen", ylabel=f"dev {metric} (median over seeds)")
    ax_l.legend(fontsize=8)
    ax_e.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def plot_cost(path, out, plt):
    with open(path) as f:
        data = json.load(f)
    rows = data["results"]
    kd_units = next(r["passes"]["units"] for r in rows if r["method"] == "kd")
    fig, ax = plt.subplots(figsize=(1.0 * len(rows) + 2, 4))
    xs = range(len(rows))
    ratios = [r["ratio_to_kd"] for r in rows]
    err = [[r["ratio_to_kd"] - r.get("per_round_ratio_min", r["ratio_to_kd"]) for r in rows],
           [r.get("per_round_ratio_max", r["ratio_to_kd"]) - r["ratio_to_kd"] for r in rows]]  # fmt: skip
    ax.bar(xs, ratios, color="#9ecae1", yerr=err, capsize=3, label="measured: median ms/step / kd's (per-round range)")
    ax.scatter(xs, [r["passes"]["units"] / kd_units for r in rows], marker="_", s=300, color="firebrick", zorder=4,
               label="passes counted: forward-units / kd's (student only)")  # fmt: skip
    for x, r in zip(xs, ratios):
        ax.annotate(f"{r:.2f}", (x, r), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(list(xs), [r["method"] for r in rows], rotation=30, ha="right")
    env = data.get("environment", {})
    ax.set_ylabel("time per optimizer step / kd's")
    ax.set_title(f"step cost, {data['setup']['batch_size']} x {data['setup']['seq_len']} tokens, "
                 f"{env.get('cpu', '?')} ({env.get('threads', '?')} thread), torch {env.get('torch', '?')}",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("summaries", nargs="*", help="summary.json[=SUFFIX] (the quality plot)")
    p.add_argument("--cost", metavar="JSON", help="benchmarks/step_cost.py's JSON: the step-cost plot instead")
    p.add_argument("--curves", metavar="DIR|JSON", help="SWEEP/TASK folder or a curves JSON: learning curves instead")
    p.add_argument("--curves_json", help="with --curves DIR: also write the gathered curves here")
    p.add_argument("--out", required=True, help="PNG path")
    args = p.parse_args(argv)
    if sum(map(bool, (args.summaries, args.cost, args.curves))) != 1:
        p.error("give sweep summaries, or --cost JSON, or --curves DIR|JSON (one of them)")
    if args.curves_json and not (args.curves and os.path.isdir(args.curves)):
        p.error("--curves_json needs --curves with a sweep folder")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.cost:
        return plot_cost(args.cost, args.out, plt)
    if args.curves:
        if os.path.isdir(args.curves):
            curves = gather_curves(args.curves)
            if args.curves_json:
                with open(args.curves_json, "w") as f:
                    json.dump(curves, f, separators=(",", ":"))
                print(f"wrote {args.curves_json}")
        else:
            with open(args.curves) as f:
                curves = json.load(f)
        return plot_curves(curves, args.out, plt)

    rows = []
    for spec in args.summaries:
        path, _, suffix = spec.partition("=")
        rows += list(rows_from(path, suffix))
    tasks = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.1 * max(len(rows), 4) + 1, 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r[0] == task]
        xs = range(len(mine))
        medians = [r[4] for r in mine]
        # markers, not bars: the y axis does not start at 0
        ax.scatter(xs, medians, marker="D", s=45, color="#3182bd", zorder=4, label="median over seeds")
        for x, r in zip(xs, mine):
            ax.plot([x, x], [min(r[5]), max(r[5])], color="black", lw=1.5)
            ax.scatter([x] * len(r[5]), r[5], color="black", s=12, zorder=3, label="one seed" if x == 0 else None)
            ax.annotate(f"{r[4]:.3f}", (x, max(r[5])), textcoords="offset points", xytext=(0, 4), ha="center",
                        fontsize=8)  # fmt: skip
        teacher = next((r[2] for r in mine if r[2] is not None), None)
        if teacher is not None:
            ax.axhline(teacher, color="firebrick", ls="--", lw=1, label=f"teacher {teacher:.3f}")
        lo = min(min(r[5]) for r in mine)
        hi = max([max(r[5]) for r in mine] + [teacher or 0])
        ax.set_ylim(lo - 0.03, hi + 0.02)
        ax.set_xticks(list(xs), [f"{r[3]} (n={len(r[5])})" for r in mine], rotation=30, ha="right")
        ax.set_xlim(-0.6, len(mine) - 0.4)
        ax.set_ylabel(f"dev {mine[0][1]}")
        n = max(len(r[5]) for r in mine)
        ax.set_title(f"{task}: best dev {mine[0][1]}, median and min-max over up to {n} seeds", fontsize=9)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
