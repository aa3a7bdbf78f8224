"""Choose AD²'s perturbation on dev, then read the chosen setting out on test over several seeds: settings x the
offline tasks x seeds, one distill_glue run each, one at a time.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ad2_selection.py --out_dir runs/ad2-selection --seeds 42 43 44 \
        --json_out docs/results/quality/ad2-selection.json

Each setting is a list of distill_glue flags (``SETTINGS``; ``--settings`` picks some, in order). The runs go
setting-major (every task of one setting before the next, so a sweep stopped early leaves whole rows) or, with
``--task_major``, task by task; seed after seed. A run whose ``results.json`` exists is skipped, so re-running resumes.
The runs of a task share a teacher cache by what they need (:func:`teacher_cache`: logits; logits and hidden states;
an augmented training set), and a setting with an attention loss runs its teacher live.

Selection reads dev of the first seed only: each run's best dev score (the task's main metric), per setting the score
minus kd's and minus the ε = 0 control's on each *finished* task (one where every candidate setting has a run), and
the issue's rule: the setting with the highest median over those tasks of (setting − kd), kd, the baselines
(``TABLE_ONLY``) and the controls (``eps0``, ``*-random``) excluded (:func:`select`). Only then is test read
(:func:`test_table`): the teacher, the baselines, the ε = 0 control, the chosen setting's random-direction control, the
chosen setting and the paper's literal preset; each run's test score (scored once by ``run_distillation`` with the
student chosen on dev), median [min-max] over the seeds, minus kd, % of the teacher, and whole-run seconds.

A sweep can go on elsewhere: ``--merge_json`` reads the runs an earlier ``--json_out`` recorded and counts each one
whose run directory is not here (marked ``recorded_in``); a run directory here wins.
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
# offline tasks run only when --tasks names them (the default sweep, and the tables made from it, stay the four above)
OPTIONAL_TASKS = ("sentiment3",)
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
    "ex-l2-abs1-random": _DKD0 + ["--epsilon", "1", "--step_size", "1", "--random_direction"],
    "smart": ["--method", "ad2-smart", "--w_hidden", "0", "--w_attention", "0"],
    "tok-l2-rel0.2": _DKD0 + ["--perturb_norm", "token-l2", "--perturb_size", "relative"]
    + ["--epsilon", "0.2", "--step_size", "0.2"],
    "tok-linf-rel0.05-preln": _DKD0 + ["--perturb_norm", "token-linf", "--perturb_size", "relative"]
    + ["--perturb_place", "pre-ln", "--epsilon", "0.05", "--step_size", "0.05"],
    # the deep-KD weight axis (hidden states and attention maps, both weights): small and the paper's 1
    "ex-l2-abs1-dkd0.1": _DKD0 + ["--epsilon", "1", "--step_size", "1", "--w_hidden", "0.1", "--w_attention", "0.1"],
    "ex-l2-abs1-dkd1": _DKD0 + ["--epsilon", "1", "--step_size", "1", "--w_hidden", "1", "--w_attention", "1"],
    # the test table's other rows
    "finetune": ["--method", "finetune"],
    "pkd": ["--method", "pkd"],
    "paper": ["--method", "ad2-paper"],
    "eda4": ["--method", "kd", "--augment_copies", "4"],
    # round 3 (issue 20): the default ad2 (ex-l2-abs1's perturbation) with one new option each, and a composition
    "ad2-clean-grad": ["--method", "ad2", "--ascent", "clean_grad"],  # δ from the clean backward: 6 forward units
    "ad2-free": ["--method", "ad2", "--ascent", "free"],  # one δ per example carried across epochs: 6 units
    "ad2-grow": ["--method", "ad2", "--epsilon_schedule", "linear", "--epsilon", "0.25", "--step_size", "0.25"]
    + ["--epsilon_end", "2"],  # a curriculum radius (CAT-like growth, linear): ε = η from 0.25 to 2
    "ad2-eda1": ["--method", "ad2", "--augment_copies", "1"],  # AD2 on the originals and 1 edited copy: 14 units
    # per sentence and epoch, within kd + EDA x4's 15
    "ad2-eda1-random": ["--method", "ad2", "--augment_copies", "1", "--random_direction"],  # its random control
    "ad2-eda4": ["--method", "ad2", "--augment_copies", "4"],  # AD2 on the originals and their 4 edited copies
    "kd-mixup": ["--method", "kd", "--mixup_alpha", "0.4"],  # MixKD: teacher-labelled embedding mixup (live teacher)
}  # fmt: skip


def run_config_of(setting: str):
    """The RunConfig a setting's flags give (the recipe's own parser; what its teacher must provide)."""
    from ad2_ds.cli import config_from_args, run_parser

    argv = ["--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json"), *SETTINGS[setting]]
    return config_from_args(run_parser(__doc__).parse_args(argv))


def forward_units(setting: str) -> dict:
    """A setting's student passes, in docs/ARCHITECTURE.md's "Passes per step" units (a forward 1, a full backward 2,
    an input-only backward 1; ``benchmarks/step_cost.py`` counts them with hooks, and tests/test_ad2_selection.py
    checks this arithmetic against its counter): per step, and per original training sentence and epoch (a step over
    an edited copy costs what one over an original does). Under ZeRO-3 the kl ascent's first gradient costs one
    forward more (8 for the default)."""
    run = run_config_of(setting)
    cfg = run.objective
    units = 3  # the clean forward and its backward
    if cfg.adversarial:
        if cfg.zero_delta or cfg.ascent != "kl":  # δ = 0 (no ascent), clean_grad / free (δ without an input-only
            units += 3  # backward): the adversarial forward and its backward
        elif cfg.perturbation == "smart":
            units += 2 * cfg.pga_steps + 3  # from noise: every step a forward and an input-only backward
        else:  # the first gradient from the clean graph (fast_pga, no random start), each further step 2
            first = 1 if cfg.fast_pga and not cfg.random_start else 2
            units += first + 2 * (cfg.pga_steps - 1) + 3
    if cfg.mixup:
        units += 3  # MixKD: a student forward on the mixed batch and its backward (and one teacher forward)
    return {"per_step": units, "per_sentence_epoch": units * (1 + run.data.augment_copies)}


def teacher_cache(out_dir: str, task: str, setting: str):
    """The teacher cache a setting's runs share, or None: a cache keeps logits (and hidden states), never attention
    maps, so a setting with an attention loss runs its teacher live; logits-only, with-hidden-states and augmented
    training sets each get their own cache (a cache is keyed by what it holds and would be rebuilt otherwise)."""
    run = run_config_of(setting)
    if not run.objective.teacher_cacheable:  # attention maps or mixup: the teacher runs live
        return None
    name = task + ("-hidden" if run.objective.needs_hidden_states else "")
    if run.data.augment_copies:
        name += f"-eda{run.data.augment_copies}"
    return os.path.join(out_dir, "cache", name)


def run_dir(out_dir: str, task: str, setting: str, seed: int) -> str:
    return os.path.join(out_dir, task, setting, f"seed{seed}")


def run_one(args, task: str, setting: str) -> int:
    out = run_dir(args.out_dir, task, setting, args.seed)
    cache = teacher_cache(args.out_dir, task, setting)
    flags = (["--teacher_cache", cache] if cache else []) + SETTINGS[setting] + model_flags(args)
    return run_recipe(out, args.deepspeed, task, args.seed, flags, f"{task} {setting}")


def run_recipe(out: str, deepspeed: str, task: str, seed: int, flags: list, label: str) -> int:
    """One distill_glue run into ``out`` (skipped when its results.json exists), its output in ``out/log.txt``; on
    success only results.json and the log are kept. Returns the exit code."""
    if os.path.isfile(os.path.join(out, "results.json")):
        return 0
    argv = [sys.executable, os.path.join(ROOT, "recipes", "distill_glue.py"), "--deepspeed", deepspeed]
    argv += ["--task", task, "--seed", str(seed), "--output_dir", out, "--overwrite_output_dir", "--no_progress"]
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(out, "log.txt"), "w") as log:
        rc = subprocess.call(argv + flags, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"{label}: rc {rc}, {time.time() - t0:.0f} s", flush=True)
    if rc == 0:
        for name in ("best", "checkpoints"):  # keep results.json and the log only
            subprocess.call(["rm", "-rf", os.path.join(out, name)])
    return rc


def model_flags(args) -> list:
    """The teacher and student every run of the sweep gets (default: the task's default teacher, the recipe's
    default student); a sweep with other models wants its own --out_dir (its caches and run folders live there)."""
    out = []
    for name in ("teacher", "student", "student_layers"):
        if getattr(args, name, None):
            out += [f"--{name}", getattr(args, name)]
    return out


def read_run(path: str) -> dict:
    from ad2_ds.data.tasks import get_task

    with open(os.path.join(path, "results.json")) as f:
        r = json.load(f)
    metric = get_task(r["task"]).main_metric
    setup = r.get("setup_seconds", {})
    return {
        "metric": metric,
        "dev": r["best"][metric],
        "test": (r.get("test") or {}).get(metric),  # the dev-chosen student, scored once; None before test existed
        "task": r["task"],
        "max_seq_length": r["args"]["max_seq_length"],
        "teacher_dev": (r.get("teacher_scores") or {}).get(metric),
        "teacher": r.get("teacher"),
        "train_seconds": round(r["train_seconds"], 1),
        "total_seconds": round(r["train_seconds"] + sum(setup.values()), 1),
        "config": {k: r["config"][k] for k in ("method", "epsilon", "step_size", "pga_steps", "perturbation")}
        | {k: r["config"].get(k) for k in ("perturb_norm", "perturb_size", "perturb_place", "random_direction")},
    }


def recorded_runs(paths) -> dict:
    """The runs of earlier ``--json_out`` files, {(setting, task, seed): run}, each marked with the file it came from
    (kept when a later file is written from it); the first file that has a run gives it."""
    out = {}
    for path in paths:
        with open(path) as f:
            earlier = json.load(f)
        for setting, by_task in earlier.get("runs", {}).items():
            for task, rs in by_task.items():
                for r in rs if isinstance(rs, list) else [rs]:
                    out.setdefault((setting, task, r["seed"]), {"recorded_in": os.path.basename(path)} | r)
    return out


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


def is_control(setting: str) -> bool:
    """kd (the reference), the other baselines (finetune, pkd, kd + EDA), the ε = 0 control and the random-direction
    controls never win the selection."""
    return setting in ("kd", "eps0", "finetune", "pkd") or setting.startswith("eda") or setting.endswith("-random")


def finished_tasks(scores: dict, settings, tasks) -> list:
    """The tasks (in ``tasks``' order) where every setting in ``settings`` has a dev score."""
    return [t for t in tasks if all(t in scores.get(s, {}) for s in settings)]


def select(dev_scores: dict, settings, tasks):
    """The issue's rule, on dev only: among the non-control settings, the highest median over the finished tasks of
    (setting − kd); ties go to the earlier setting in ``settings``. dev_scores: {setting: {task: dev score}}.
    Returns (setting or None, the finished tasks, {setting: median in points})."""
    done = finished_tasks(dev_scores, settings, tasks)
    if "kd" not in settings or not done:
        return None, done, {}
    summary = summarise({s: {t: dev_scores[s][t] for t in done} for s in settings})
    medians = {s: summary[s]["median_minus_kd"] for s in settings if not is_control(s)}
    if not medians:
        return None, done, medians
    best = max(medians.values())
    return next(s for s in settings if s in medians and medians[s] == best), done, medians


def random_control(setting: str):
    """The random-direction control of ``setting`` (same flags plus --random_direction), when SETTINGS has it."""
    name = f"{setting}-random"
    return name if name in SETTINGS else None


def teacher_test(runs_of_task: dict) -> dict:
    """The teacher's test score for one task: from the fine-tuning run's ``finetune_results.json`` (written beside the
    default teacher) when it holds one, else scored here on the task's test split (teachers fine-tuned before
    ``run_distillation`` scored test)."""
    run = next(iter(runs_of_task.values()))
    teacher, metric = run["teacher"], run["metric"]
    path = os.path.join(teacher or "", "finetune_results.json")
    if os.path.isfile(path):
        with open(path) as f:
            test = json.load(f).get("test")
        if test and metric in test:
            return {"test": test[metric], "source": path, "path": teacher}
    return {"test": score_teacher_on_test(teacher, run["task"], run["max_seq_length"])[metric], "path": teacher,
            "source": "scored by ad2_selection.py (finetune_results.json has no test score)"}  # fmt: skip


def score_teacher_on_test(teacher: str, task_name: str, max_seq_length: int) -> dict:
    """The fine-tuned teacher checkpoint's metrics on the task's test split (eval mode, batches of 32, one process)."""
    import datasets
    from transformers import AutoTokenizer

    from ad2_ds.data.glue import DataCollator, tokenize_dataset
    from ad2_ds.run import DataConfig, load_classifier, load_data
    from ad2_ds.trainer import evaluate

    task, splits = load_data(DataConfig(task=task_name, max_seq_length=max_seq_length), rank_zero_first=False)
    tok = AutoTokenizer.from_pretrained(teacher)
    test, _ = tokenize_dataset(datasets.DatasetDict({"test": splits[task.test_split]}), tok, max_seq_length)
    model = load_classifier(teacher, task.num_labels, False, False, "teacher")
    return evaluate(model, {"test": test["test"]}, DataCollator(tok.pad_token_id), task, 32)


# Rows of the test table only, never candidates, and no part of what makes a task "finished" for the selection (the
# paper's literal preset is a reference row: its deep-KD weight 1 is on the candidates' axis at the chosen radius).
TABLE_ONLY = ("finetune", "pkd", "eda4", "paper")
# The test table's rows besides the chosen setting and its random control, in print order (those run are shown).
BASELINES = ("finetune", "kd", "pkd", "eda4", "eps0")
PAPER = "paper"


def _cell(values: list) -> dict:
    """Median [min, max] over seeds, and how many (values in points)."""
    return {"test": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "n": len(values)}  # fmt: skip


def test_table(runs: dict, chosen: str, tasks, teachers: dict, extra=()) -> dict:
    """After selection, on test: per row and task the median over seeds of the test score (points) with [min, max] and
    the number of seeds, minus kd (median minus kd's median), % of the teacher (the median over the teacher's),
    and the median whole-run seconds; plus the means over ``tasks`` of a row that has every task.
    Rows: the teacher, the baselines (finetune, kd, pkd, kd + EDA, the ε = 0 control), the chosen setting's random
    control, ``extra`` (rows read on test for another question than the selection's, e.g. whether a cheaper ascent
    stays within the seed spread of the default), the chosen setting, the paper's literal preset; those with runs.
    runs: {setting: {task: [read_run(...) per seed]}} (one dict instead of a list: one seed);
    teachers: {task: {"test": score}}."""
    rows = {"teacher": {t: {"test": round(100 * teachers[t]["test"], 2)} for t in tasks}}
    order = [*BASELINES, random_control(chosen), *extra, chosen, PAPER]
    for setting in order:
        if setting is None or setting in rows or setting not in runs:
            continue
        row = {}
        for t in tasks:
            mine = _scored(runs[setting].get(t))
            if not mine:
                continue
            kd = _scored(runs.get("kd", {}).get(t))
            scores = [100 * r["test"] for r in mine]
            row[t] = _cell(scores) | {
                "minus_kd": None,
                "pct_teacher": round(statistics.median(scores) / teachers[t]["test"], 2),
                "total_seconds": round(statistics.median(r["total_seconds"] for r in mine), 1),
            }
            if kd:
                row[t]["minus_kd"] = round(row[t]["test"] - statistics.median(100 * r["test"] for r in kd), 2)
        rows[setting] = row | {"units": forward_units(setting)}
    means = {}
    for setting, row in rows.items():
        if all(t in row for t in tasks):
            means[setting] = {
                k: round(statistics.mean(row[t][k] for t in tasks), 2)
                for k in ("test", "minus_kd", "pct_teacher")
                if all(row[t].get(k) is not None for t in tasks)
            }
    return {"rows": rows, "means": means}


def _scored(runs) -> list:
    """The runs (one, or one per seed) that have a test score."""
    if runs is None:
        return []
    return [r for r in (runs if isinstance(runs, list) else [runs]) if r.get("test") is not None]


def goal(table: dict, chosen: str, tasks) -> dict:
    """The issues' goals, read on this table (medians over the seeds run; they ask for 3). Round 2 (issue 13): the
    chosen setting ≥ +1.0 point over kd on at least 3 of 4 tasks, ≥ +0.5 over the ε = 0 control on average, ≥ 98.5%
    of the teacher on average (``reached``). Round 3 (issue 20, ``ahead_of_eda4``): the chosen setting's test mean
    above kd + EDA x4's, and on every task where kd leaves ≥ 1 point to the teacher at least half of that gap closed
    (``gap_closed``: the share per such task). Also the fewest seeds behind a cell of the chosen row, and its median
    whole-run seconds over kd's (noisy on a shared machine; the step cost is the pass count)."""
    rows = table["rows"]
    mine, eps0 = rows.get(chosen, {}), rows.get("eps0", {})
    scored = [t for t in tasks if t in mine]
    plus1 = [t for t in scored if (mine[t]["minus_kd"] or 0) >= 1.0]
    both = [t for t in scored if t in eps0]
    over_eps0 = round(statistics.mean(mine[t]["test"] - eps0[t]["test"] for t in both), 2) if both else None
    pct = table["means"].get(chosen, {}).get("pct_teacher")
    kd, teacher = rows.get("kd", {}), rows.get("teacher", {})
    timed = [t for t in scored if t in kd]
    gaps = {t: teacher[t]["test"] - kd[t]["test"] for t in timed if t in teacher}
    gap_closed = {t: round((mine[t]["test"] - kd[t]["test"]) / g, 2) for t, g in gaps.items() if g >= 1.0}
    means = table["means"]
    over_eda = None
    if chosen in means and "eda4" in means:
        over_eda = round(means[chosen]["test"] - means["eda4"]["test"], 2)
    return {
        "tasks_at_least_plus1_over_kd": plus1,
        "mean_minus_eps0": over_eps0,
        "mean_pct_teacher": pct,
        "reached": len(plus1) >= 3 and over_eps0 is not None and over_eps0 >= 0.5 and pct is not None and pct >= 98.5,
        "mean_minus_eda4": over_eda,
        "gap_closed": gap_closed,
        "ahead_of_eda4": over_eda is not None and over_eda > 0 and all(v >= 0.5 for v in gap_closed.values()),
        "min_seeds": min((mine[t].get("n", 1) for t in scored), default=0),
        "seconds_vs_kd": round(statistics.mean(mine[t]["total_seconds"] / kd[t]["total_seconds"] for t in timed), 2)
        if timed
        else None,
        "units": mine.get("units"),
    }


NAMES = {"teacher": "teacher", "finetune": "finetune (no teacher)", "kd": "kd", "pkd": "pkd", "eda4": "kd + EDA x4",
         "eps0": "ε = 0 control", "paper": "the paper's literal preset (`ad2-paper`)"}  # fmt: skip


def markdown(summary: dict, table: dict, chosen: str, tasks, metrics: dict) -> str:
    """The dev table (selection seed) and the test table as markdown: cells in points, Δ against kd."""
    head = "| setting | " + " | ".join(f"{t} ({metrics[t]}) | Δ kd" for t in tasks) + " | median Δ kd |"
    lines = ["Dev (selects):", "", head, "|---|" + "--:|--:|" * len(tasks) + "--:|"]
    for setting, row in summary.items():
        cells = []
        for t in tasks:
            dev, d = row["dev"].get(t), row["minus_kd"].get(t)
            diff = "–" if d is None or setting == "kd" else f"{d + 0:+.2f}"  # + 0: no -0.00
            cells += ["–" if dev is None else f"{100 * dev:.2f}", diff]
        median = "" if setting == "kd" or row["median_minus_kd"] is None else f"{row['median_minus_kd']:+.2f}"
        lines.append(f"| {NAMES.get(setting, setting)} | " + " | ".join(cells) + f" | {median} |")
    if table:
        cols = " | ".join(f"{t} | Δ kd | % teacher | s" for t in tasks)
        head = f"| row | {cols} | mean Δ kd | mean % teacher | units / step (/ sentence-epoch) |"
        lines += ["", f"Test (median [min-max] over seeds, n seeds; chosen: `{chosen}`):", "", head,
                  "|---|" + "--:|--:|--:|--:|" * len(tasks) + "--:|--:|--:|"]  # fmt: skip
        for setting, row in table["rows"].items():
            cells = []
            for t in tasks:
                c = row.get(t)
                if c is None:
                    cells += ["–", "", "", ""]
                elif setting == "teacher":
                    cells += [f"{c['test']:.2f}", "", "", ""]
                else:
                    d = "" if c["minus_kd"] is None or setting == "kd" else f"{c['minus_kd'] + 0:+.2f}"  # no -0.00
                    spread = f"{c['test']:.2f} [{c['min']:.2f}-{c['max']:.2f}] n{c['n']}"
                    cells += [spread, d, f"{c['pct_teacher']:.1f}", f"{c['total_seconds']:.0f}"]
            mean = table["means"].get(setting, {})
            dm = "" if setting in ("kd", "teacher") or mean.get("minus_kd") is None else f"{mean['minus_kd']:+.2f}"
            pm = "" if mean.get("pct_teacher") is None else f"{mean['pct_teacher']:.1f}"
            name = f"**{setting} (chosen)**" if setting == chosen else NAMES.get(setting, setting)
            u = row.get("units")
            units = f"{u['per_step']} ({u['per_sentence_epoch']})" if u else ""
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {dm} | {pm} | {units} |")
    return "\n".join(lines) + "\n"


def print_test(table: dict, chosen: str, tasks) -> None:
    print(f"test (after selection on dev; median [min-max] over seeds; seconds on a shared machine): chosen {chosen}")
    for setting, row in table["rows"].items():
        cells = []
        for t in tasks:
            c = row.get(t)
            if c is None:
                cells.append(f"{t}=-")
            elif setting == "teacher":
                cells.append(f"{t}={c['test']:.2f}")
            else:
                d = "-" if c["minus_kd"] is None else f"{c['minus_kd']:+.2f}"
                spread = f"{c['test']:.2f} [{c['min']:.2f}-{c['max']:.2f}] n{c['n']}"
                cells.append(f"{t}={spread} ({d} kd, {c['pct_teacher']:.1f}%, {c['total_seconds']:.0f} s)")
        print(f"{setting:<24} " + "  ".join(cells) + f"  mean {table['means'].get(setting)}")
    control = random_control(chosen)
    if control not in table["rows"]:
        print(f"random control of {chosen}: {control or 'not in SETTINGS'} was not run")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", default="runs/ad2-selection")
    p.add_argument("--deepspeed", default=os.path.join(ROOT, "ds_configs", "zero2.json"))
    p.add_argument("--seeds", "--seed", nargs="+", type=int, default=[42], help="the first one selects (dev)")
    tasks_help = f"default: {' '.join(TASKS)}; also {' '.join(OPTIONAL_TASKS)} (3-class sentiment)"
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help=tasks_help)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--task_major", action="store_true", help="run every setting of a task before the next task")
    p.add_argument("--collect_only", action="store_true")
    p.add_argument("--json_out")
    p.add_argument("--markdown_out", help="also write the dev and test tables as markdown")
    p.add_argument("--merge_json", nargs="+", default=[], metavar="JSON",
                   help="earlier --json_out files: their runs fill in every (setting, task, seed) that has no run "
                   "directory here (a sweep continued on another machine); a run here always wins")  # fmt: skip
    p.add_argument("--test_rows", nargs="+", default=[], choices=list(SETTINGS), metavar="SETTING",
                   help="after the selection, also read these settings on test (rows of the test table; they must be "
                   "in --settings); they take no part in choosing")  # fmt: skip
    p.add_argument("--teacher", help="every run's --teacher (e.g. all-mpnet-base-v2; default: the task's default)")
    p.add_argument("--student", help="every run's --student (e.g. all-MiniLM-L6-v2; default: cut from the teacher)")
    p.add_argument("--student_layers", help="every run's --student_layers (e.g. skip:6)")
    args = p.parse_args(argv)
    failed = []
    if not args.collect_only:
        order = [(t, s) for s in args.settings for t in args.tasks]
        if args.task_major:
            order = [(t, s) for t in args.tasks for s in args.settings]
        for seed in args.seeds:
            for task, setting in order:
                if run_one(argparse.Namespace(**{**vars(args), "seed": seed}), task, setting):
                    failed.append(f"{task}/{setting}/seed{seed}")
    recorded = recorded_runs(args.merge_json)
    runs = {}  # {setting: {task: [run per seed that has one]}}
    for setting in args.settings:
        for task in args.tasks:
            for seed in args.seeds:
                path = run_dir(args.out_dir, task, setting, seed)
                if os.path.isfile(os.path.join(path, "results.json")):
                    run = read_run(path) | {"seed": seed}
                elif (setting, task, seed) in recorded:
                    run = recorded[setting, task, seed]
                else:
                    continue
                runs.setdefault(setting, {}).setdefault(task, []).append(run)
    select_seed = args.seeds[0]
    scores = {}  # dev of the selection seed only
    for setting, by_task in runs.items():
        for task, rs in by_task.items():
            if rs[0]["seed"] == select_seed:
                scores.setdefault(setting, {})[task] = rs[0]["dev"]
    summary = summarise(scores)
    print(f"dev (selection, seed {select_seed}):")
    for setting, row in summary.items():
        dev = " ".join(f"{t}={100 * v:.2f}" for t, v in row["dev"].items())
        print(f"{setting:<24} {dev}  median-kd {row['median_minus_kd']}  median-eps0 {row['median_minus_eps0']}")
    candidates = [s for s in args.settings if s not in TABLE_ONLY]  # baselines of the table: no say in "finished"
    chosen, done, medians = select(scores, candidates, args.tasks)  # dev only: nothing above reads test
    print(f"finished tasks {done}; median over them of (setting - kd), controls excluded: {medians}; chosen {chosen}")
    table = teachers = verdict = None
    if chosen is not None:
        teachers = {t: teacher_test({s: runs[s][t][0] for s in args.settings if t in runs.get(s, {})}) for t in done}
        table = test_table(runs, chosen, done, teachers, extra=[s for s in args.test_rows if s != chosen])
        verdict = goal(table, chosen, done)
        print_test(table, chosen, done)
        print(f"goal (seeds {args.seeds}, {len(done)} tasks): {verdict}")
    if args.markdown_out:
        from ad2_ds.data.tasks import get_task

        metrics = {t: get_task(t).main_metric for t in args.tasks}
        with open(args.markdown_out, "w") as f:
            f.write(markdown(summary, table, chosen, done or list(metrics), metrics))
    if args.json_out:
        result = {
            "command": "PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ad2_selection.py "
            + " ".join(argv or sys.argv[1:]),
            "split": "dev selects (best evaluation of each run); test is read after selection",
            "seeds": args.seeds,
            "selection_seed": select_seed,
            "model_flags": model_flags(args),
            "settings": {s: SETTINGS[s] for s in args.settings},
            "runs": runs,
            "summary": summary,
            "selection": {
                "finished_tasks": done,
                "median_minus_kd": medians,
                "chosen": chosen,
                "random_control": chosen and random_control(chosen),
            },
            "teachers": teachers,
            "test": table,
            "goal": verdict,
            "failed": failed,
        }
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
