"""benchmarks/ad2_selection.py: the selection arithmetic (no runs)."""

import json
import os

import ad2_selection  # benchmarks/ is on pytest's pythonpath
import pytest


def test_summary_differences_and_medians_in_points():
    scores = {
        "kd": {"a": 0.80, "b": 0.90, "c": 0.70},
        "eps0": {"a": 0.81, "b": 0.90, "c": 0.70},
        "x": {"a": 0.83, "b": 0.89, "c": 0.72},
    }
    s = ad2_selection.summarise(scores)
    assert s["x"]["minus_kd"] == {"a": 3.0, "b": -1.0, "c": 2.0}
    assert s["x"]["median_minus_kd"] == 2.0
    assert s["x"]["median_minus_eps0"] == 2.0  # 2, -1, 2
    assert s["kd"]["median_minus_kd"] == 0.0


@pytest.mark.parametrize("setting", list(ad2_selection.SETTINGS))
def test_every_setting_is_a_valid_run(setting, tmp_path):
    from recipes import distill_glue

    ds = os.path.join(ad2_selection.ROOT, "ds_configs", "zero2.json")
    flags = ["--deepspeed", ds, "--output_dir", str(tmp_path)]
    cfg = distill_glue.parse_args(flags + ad2_selection.SETTINGS[setting]).objective  # the RunConfig checks itself
    assert cfg.adversarial == (setting != "kd") and not cfg.deep_kd  # one logits-only teacher cache per task
    assert cfg.zero_delta == (setting == "eps0") and cfg.random_direction == setting.endswith("-random")


def test_selection_takes_the_median_over_finished_tasks_and_never_a_control():
    settings = ["kd", "eps0", "x", "x-random", "y"]
    dev = {
        "kd": {"a": 0.80, "b": 0.90, "c": 0.70, "d": 0.50},
        "eps0": {"a": 0.90, "b": 0.99, "c": 0.80, "d": 0.50},  # best median of all, but a control
        "x": {"a": 0.82, "b": 0.90, "c": 0.71, "d": 0.50},  # +2, 0, +1 -> median +1
        "x-random": {"a": 0.85, "b": 0.95, "c": 0.75},  # a control; d unfinished (no run)
        "y": {"a": 0.80, "b": 0.905, "c": 0.705, "d": 0.90},  # 0, +0.5, +0.5 -> +0.5 (d would make it +0.5..+20)
    }
    chosen, done, medians = ad2_selection.select(dev, settings, ["a", "b", "c", "d"])
    assert done == ["a", "b", "c"]  # d lacks x-random's run: not finished, not counted
    assert medians == {"x": 1.0, "y": 0.5}  # controls and kd are not candidates
    assert chosen == "x"
    dev["y"].update(a=0.81, b=0.91, c=0.71)  # y: +1, +1, +1 -> median +1, x's: the tie goes to the earlier setting
    assert ad2_selection.select(dev, settings, ["a", "b", "c", "d"])[0] == "x"
    assert ad2_selection.select(dev, ["kd", "eps0", "x-random"], ["a", "b", "c"])[0] is None  # only controls
    assert ad2_selection.select(dev, ["eps0", "x"], ["a", "b", "c"])[0] is None  # no kd: no rule


def _write_run(out_dir, task, setting, dev, test, teacher, seconds=100.0):
    path = ad2_selection.run_dir(str(out_dir), task, setting, 42)
    os.makedirs(path)
    metric = "accuracy"
    config = {"method": "kd", "epsilon": 0, "step_size": 0, "pga_steps": 1, "perturbation": "pga"}
    results = {
        "task": task,
        "best": {metric: dev},
        "test": {metric: test},
        "teacher_scores": {metric: 0.95},
        "teacher": str(teacher),
        "train_seconds": seconds,
        "setup_seconds": {"teacher": 10.0},
        "config": config,
        "args": {"max_seq_length": 64},
    }
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(results, f)


def test_test_split_is_read_only_after_selection_and_never_enters_it(tmp_path, capsys):
    """Synthetic results.json files (no runs): the test scores favour the setting that loses on dev; the dev winner
    is still the one chosen, and only its row (and its random control) appear beside kd and eps0 on test."""
    tasks = ["trec", "movie-polarity"]  # both: accuracy
    settings = ["kd", "eps0", "ex-l2-abs1", "ex-l2-abs1-random", "tok-l2-rel0.05"]
    dev = {"kd": 0.80, "eps0": 0.80, "ex-l2-abs1": 0.82, "ex-l2-abs1-random": 0.79, "tok-l2-rel0.05": 0.81}
    test = {"kd": 0.78, "eps0": 0.785, "ex-l2-abs1": 0.79, "ex-l2-abs1-random": 0.775, "tok-l2-rel0.05": 0.99}
    for task in tasks:
        teacher = tmp_path / f"teacher-{task}"
        teacher.mkdir()
        (teacher / "finetune_results.json").write_text(json.dumps({"test": {"accuracy": 0.80}}))
        for s in settings:
            _write_run(tmp_path / "runs", task, s, dev[s], test[s], teacher)
    out = tmp_path / "sel.json"
    argv = ["--collect_only", "--out_dir", str(tmp_path / "runs"), "--json_out", str(out)]
    assert ad2_selection.main(argv + ["--tasks", *tasks, "--settings", *settings]) == 0
    result = json.loads(out.read_text())
    assert result["selection"]["chosen"] == "ex-l2-abs1"  # dev +2 beats dev +1, although its test is 20 points lower
    assert result["selection"]["median_minus_kd"] == {"ex-l2-abs1": 2.0, "tok-l2-rel0.05": 1.0}
    assert result["selection"]["random_control"] == "ex-l2-abs1-random"
    rows = result["test"]["rows"]
    assert list(rows) == ["teacher", "kd", "eps0", "ex-l2-abs1", "ex-l2-abs1-random"]  # not the test winner
    cell = rows["ex-l2-abs1"]["trec"]
    assert cell == {"test": 79.0, "minus_kd": 1.0, "pct_teacher": 98.75, "total_seconds": 110.0}
    assert rows["teacher"]["trec"] == {"test": 80.0}
    assert result["teachers"]["trec"]["source"].endswith("finetune_results.json")
    assert result["test"]["means"]["eps0"]["minus_kd"] == 0.5
    assert result["test"]["means"]["teacher"] == {"test": 80.0}
    assert result["goal"] == {
        "tasks_at_least_plus1_over_kd": tasks,
        "mean_minus_eps0": 0.5,
        "mean_pct_teacher": 98.75,
        "reached": False,  # 2 tasks, the rule asks for 3 of 4 at +1.0
    }
    assert "chosen ex-l2-abs1" in capsys.readouterr().out
