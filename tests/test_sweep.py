"""recipes/sweep_glue.py: derived DeepSpeed JSONs, best-by-median selection, resume by skipping, and one real sweep
of two tiny runs (each in its own process) on the GLUE-format fixture."""

import json
from pathlib import Path

import pytest

from conftest import save_tiny_teacher, write_glue_fixture

ROOT = Path(__file__).resolve().parents[1]


def _fake_results(out, method, score, epsilon=1e-5):
    out.mkdir(parents=True)
    results = {
        "config": {"method": method, "epsilon": epsilon},
        "best": {"step": 3, "accuracy": score},
        "teacher_scores": {"accuracy": 0.9},
        "train_seconds": 1.0,
        "samples_per_second": 2.0,
    }
    (out / "results.json").write_text(json.dumps(results))


def test_grid_writes_one_ds_json_per_point_with_lr_and_micro_batch(tmp_path):
    from recipes import sweep_glue

    path = sweep_glue.write_ds_config(ROOT / "ds_configs" / "zero2.json", str(tmp_path), 3e-5, 32)
    cfg = json.loads(Path(path).read_text())
    base = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    assert Path(path).name == "lr3e-05-bs32.json"
    assert cfg["optimizer"]["params"]["lr"] == 3e-5 and cfg["scheduler"]["params"]["warmup_max_lr"] == 3e-5
    assert cfg["train_micro_batch_size_per_gpu"] == 32 and "train_batch_size" not in cfg
    assert cfg["zero_optimization"] == base["zero_optimization"]  # everything else is the base JSON's


def test_best_config_is_picked_by_median_over_seeds_not_by_max(tmp_path):
    from recipes import sweep_glue

    argv = ["--sweep_dir", str(tmp_path), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--methods", "kd",
            "--seeds", "1", "2", "3", "--learning_rates", "1e-4", "5e-5"]  # fmt: skip
    args, passthrough = sweep_glue.parse_args(argv)
    runs = sweep_glue.plan(args, passthrough)
    assert len(runs) == 6 and [r["seed"] for r in runs[:2]] == [1, 1]  # seed-major order
    scores = {"lr0.0001-bs16": [0.50, 0.95, 0.52], "lr5e-05-bs16": [0.60, 0.61, 0.62]}  # max favours lr 1e-4
    for run in runs:
        _fake_results(Path(run["out"]), "kd", scores[run["config"]][run["seed"] - 1])
    summary = sweep_glue.collect(args, runs)
    best = summary["tasks"]["movie-polarity"]["methods"]["kd"]["best"]
    assert best["config"] == "lr5e-05-bs16" and best["median"] == 0.61 and (best["min"], best["max"]) == (0.6, 0.62)
    assert best["n"] == 3 and summary["tasks"]["movie-polarity"]["teacher"] == 0.9
    table = sweep_glue.markdown(summary, args.seeds)
    assert "| kd | lr5e-05-bs16 | 0.6100 | [0.6000-0.6200] | 3 | 67.8 |" in table
    assert "| kd | lr0.0001-bs16 | 0.5200 | [0.5000-0.9500] | 3 |" in table  # the full grid is listed too


def test_step_size_ratio_gives_each_epsilon_its_own_step_size(tmp_path):
    from recipes import sweep_glue

    base = ["--sweep_dir", str(tmp_path), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--methods", "ad2",
            "--seeds", "1"]  # fmt: skip
    args, passthrough = sweep_glue.parse_args(base + ["--epsilons", "1e-3", "0.1", "--step_size_ratio", "1"])
    runs = sweep_glue.plan(args, passthrough)
    got = [(r["config"], float(r["argv"][r["argv"].index("--step_size") + 1])) for r in runs]
    assert got == [("lr0.0001-bs16-eps0.001", 1e-3), ("lr0.0001-bs16-eps0.1", 0.1)]
    args, passthrough = sweep_glue.parse_args(base + ["--epsilons", "1e-3"])  # without the ratio: no --step_size
    assert "--step_size" not in sweep_glue.plan(args, passthrough)[0]["argv"]


def test_pass_through_flags_get_their_own_teacher_cache(tmp_path):
    from recipes import sweep_glue

    base = ["--sweep_dir", str(tmp_path), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--methods", "kd",
            "--seeds", "1", "2"]  # fmt: skip
    caches = {}
    flags = {"plain": [], "augment": ["--augment_copies", "4"], "skip": ["--student_layers", "skip:3"],
             "neutral": ["--no_progress", "--epsilon", "1", "--eval_steps=10"]}  # fmt: skip
    for name, extra in flags.items():
        args, passthrough = sweep_glue.parse_args(base + extra)
        runs = sweep_glue.plan(args, passthrough)
        assert len({r["cache"] for r in runs}) == 1  # one cache for the seeds of a (task, method)
        caches[name] = runs[0]["cache"]
    assert caches["plain"] == caches["neutral"] == "kd"  # flags that cannot change the cache share it
    assert len(set(caches.values())) == 3  # augmented data never meets a plain cache
    assert caches["augment"].startswith("kd-") and caches["skip"].startswith("kd-")


def test_mixup_and_attention_runs_get_no_teacher_cache(tmp_path):
    from recipes import sweep_glue

    base = ["--sweep_dir", str(tmp_path), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--seeds", "1"]
    for extra, cacheable in ((["--methods", "ad2"], True), (["--methods", "ad2", "--mixup_alpha", "0.4"], False),
                             (["--methods", "ad2-paper"], False)):  # fmt: skip
        args, passthrough = sweep_glue.parse_args(base + extra)
        assert sweep_glue.teacher_cacheable(sweep_glue.plan(args, passthrough)[0]["argv"]) is cacheable, extra


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--step_size_ratio", "1"], "give --epsilons too"),
        (["--epsilons", "0.1", "--step_size_ratio", "0"], "must be > 0"),
        (["--epsilons", "0.1", "--step_size_ratio", "1", "--step_size", "1e-3"], "not both"),
    ],
)
def test_bad_step_size_ratio_is_refused(tmp_path, extra, message, capsys):
    from recipes import sweep_glue

    with pytest.raises(SystemExit):
        sweep_glue.parse_args(["--sweep_dir", str(tmp_path), "--deepspeed", "x.json", *extra])
    assert message in capsys.readouterr().err


def test_monitor_csv_keeps_the_last_run_and_joins_a_resumed_one(tmp_path):
    from ad2_ds.utils import read_monitor_csv

    path = tmp_path / "train_ce.csv"
    # the default teacher's fine-tuning (steps 16..48) wrote here first, then the student run from step 16 again
    path.write_text("step,ce\n16,0.7\n32,0.6\n48,0.5\nstep,ce\n16,0.9\n32,0.8\n")
    assert read_monitor_csv(str(path)) == [(16, 0.9), (32, 0.8)]
    # a run resumed from its step-32 checkpoint repeats step 48: the resumed values replace the lost ones
    path.write_text("step,ce\n16,0.7\n32,0.6\n48,0.5\nstep,ce\n48,0.45\n64,0.4\n")
    assert read_monitor_csv(str(path)) == [(16, 0.7), (32, 0.6), (48, 0.45), (64, 0.4)]
    path.write_text("step,ce\n")
    assert read_monitor_csv(str(path)) == []


def test_default_teacher_fine_tuning_writes_no_monitor(tmp_path):
    from ad2_ds.default_teacher import teacher_ds_config

    student = {"train_micro_batch_size_per_gpu": 16, "csv_monitor": {"enabled": True, "output_path": "x"},
               "tensorboard": {"enabled": True}, "zero_optimization": {"stage": 2}}  # fmt: skip
    teacher = teacher_ds_config(student)
    assert teacher == {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}


@pytest.mark.parametrize("flag", ["--seed", "--output_dir", "--task", "--method"])
def test_flags_the_sweep_owns_are_refused(tmp_path, flag, capsys):
    from recipes import sweep_glue

    with pytest.raises(SystemExit):
        sweep_glue.parse_args(["--sweep_dir", str(tmp_path), "--deepspeed", "x.json", flag, "1"])
    assert "set by the sweep" in capsys.readouterr().err


def test_sweep_runs_each_job_in_its_own_process_then_resumes_by_skipping(tmp_path, tiny_vocab):
    from recipes import sweep_glue

    data = write_glue_fixture(tmp_path / "glue")
    teacher = save_tiny_teacher(tmp_path / "teacher", tiny_vocab, layers=2)
    sweep = tmp_path / "sweep"
    argv = ["--sweep_dir", str(sweep), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--tasks", "sst2",
            "--methods", "kd", "ad2-dkd", "--seeds", "7", "--batch_sizes", "8", "--delete_checkpoints",
            "--csv_monitor", "--data_dir", str(data), "--teacher", str(teacher), "--student_layers", "bottom:1",
            "--max_seq_length", "16", "--num_train_epochs", "1", "--epsilon", "1e-3", "--no_progress"]  # fmt: skip
    assert sweep_glue.main(argv) == 0
    runs = [sweep / "sst2" / m / "lr0.0001-bs8" / "seed7" for m in ("kd", "ad2-dkd")]
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        assert results["engine"]["micro_batch"] == 8 and results["args"]["seed"] == 7
        assert not (run / "checkpoints").exists() and not (run / "best").exists()
        assert (run / "monitor" / "train_kd.csv").is_file()
    summary = json.loads((sweep / "summary.json").read_text())
    entry = summary["tasks"]["sst2"]["methods"]["ad2-dkd"]["best"]
    assert entry["n"] == 1 and entry["runs"][0]["train_losses"]["ada"]["steps"] == 5  # 40 examples / 8
    assert entry["median"] == json.loads((runs[1] / "results.json").read_text())["best"]["accuracy"]

    before = [(run / "results.json").stat().st_mtime_ns for run in runs]
    assert sweep_glue.main(argv) == 0  # everything done: nothing is run again
    assert [(run / "results.json").stat().st_mtime_ns for run in runs] == before
