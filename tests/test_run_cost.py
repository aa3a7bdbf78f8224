"""benchmarks/run_cost.py: labels, totals and ratios from results.json files."""

import json

import pytest


def _run(path, method, copies, eps, train, setup, cache="c", task="movie-polarity", best=None):
    path.mkdir(parents=True)
    results = {"task": task, "method": method, "args": {"augment_copies": copies, "seed": 42, "teacher_cache": cache},
               "config": {"epsilon": eps}, "best": best or {"step": 3, "accuracy": 0.8},
               "train_examples": 2000 * (copies + 1),
               "train_seconds": train, "setup_seconds": setup, "engine": {"zero_stage": 0}}  # fmt: skip
    (path / "results.json").write_text(json.dumps(results))
    return str(path)


def test_totals_labels_and_ratios_to_the_reference(tmp_path, capsys):
    import run_cost

    kd = _run(tmp_path / "kd", "kd", 0, 1e-5, 100.0, {"teacher": 10.0, "evaluate_teacher_and_latency": 10.0})
    ad2 = _run(tmp_path / "ad2", "ad2-dkd", 0, 1.0, 200.0, {"teacher": 10.0, "evaluate_teacher_and_latency": 30.0})
    eda = _run(tmp_path / "eda", "kd", 4, 1e-5, 500.0, {"teacher": 60.0, "load_and_augment_data": 2.0}, cache=None)
    out = tmp_path / "cost.json"
    run_cost.main(["--ref", "ad2-dkd", kd, ad2, eda, "--json_out", str(out)])
    rows = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in rows] == ["kd", "ad2-dkd (eps 1)", "kd + EDA x4"]
    assert [r["total_seconds"] for r in rows] == [120.0, 240.0, 562.0]
    assert [round(r["total_ratio_to_ref"], 3) for r in rows] == [0.5, 1.0, round(562 / 240, 3)]
    assert rows[2]["teacher"] == "live" and rows[2]["train_examples"] == 10000


def test_the_score_is_the_tasks_main_metric(tmp_path):
    import run_cost

    spam = _run(tmp_path / "spam", "kd", 0, 1e-5, 1.0, {}, task="sms-spam",
                best={"step": 3, "accuracy": 0.99, "f1": 0.95})  # fmt: skip
    assert (run_cost.row(spam)["metric"], run_cost.row(spam)["score"]) == ("f1", 0.95)


def test_a_folder_without_results_is_refused(tmp_path, capsys):
    import run_cost

    with pytest.raises(SystemExit) as e:
        run_cost.main([str(tmp_path)])
    assert e.value.code == 2 and "no results.json" in capsys.readouterr().err
