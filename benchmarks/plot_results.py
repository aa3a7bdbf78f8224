"""Plot the dev score per method with its seed spread, from sweep summaries (recipes/sweep_glue.py's summary.json).

    python benchmarks/plot_results.py docs/results/quality/movie-polarity.json \\
        "docs/results/quality/movie-polarity-ad2-noatt.json= (w_attention 0)" --out docs/results/quality_movie.png

Each argument is a summary.json, optionally followed by ``=SUFFIX`` appended to its method names (to tell variant
sweeps apart). Per method (its best configuration): every seed as a dot, the median as a diamond, min-max as a line;
the teacher as a dashed line. Needs matplotlib.
"""

import argparse
import json


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("summaries", nargs="+", help="summary.json[=SUFFIX]")
    p.add_argument("--out", required=True, help="PNG path")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
