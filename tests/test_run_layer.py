"""The run layer: flags from RunConfig's fields, the cache-neutral flags from their metadata, errors named by flag,
the DeepSpeed patches' targets, registered features and losses, and run_distillation called from Python on a task
with a labelled test split."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ad2_ds import RunConfig, TeacherOutput
from ad2_ds.config import AD2Config, ConfigError
from ad2_ds.run import DataConfig

from conftest import random_batch, save_tiny_teacher, tiny_bert, write_glue_fixture

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = str(ROOT / "ds_configs" / "zero2.json")


def test_flags_fill_the_config_with_the_fields_defaults():
    from recipes import distill_glue

    assert distill_glue.parse_args(["--deepspeed", ZERO2]) == RunConfig(deepspeed=ZERO2)
    c = distill_glue.parse_args(
        ["--deepspeed_config", ZERO2, "--no_progress", "--naive_pga", "--teacher_ranks", "0,1", "--w_hidden", "2",
         "--max_seq_length", "32", "--random_start"]
    )  # fmt: skip
    assert (c.progress, c.objective.fast_pga, c.objective.random_start) == (False, False, True)
    assert c.teacher_ranks == (0, 1) and c.objective.w_hidden == 2.0 and c.data.max_seq_length == 32
    assert RunConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_the_perturbation_flags_come_from_the_objective_fields():
    from recipes import distill_glue

    c = distill_glue.parse_args(
        ["--deepspeed", ZERO2, "--method", "ad2-dkd", "--perturb_norm", "token-l2", "--perturb_size", "relative",
         "--perturb_place", "pre-ln", "--epsilon", "0.05", "--step_size", "0.05", "--pga_steps", "2",
         "--random_direction"]
    ).objective  # fmt: skip
    assert (c.perturbation, c.perturb_norm, c.perturb_size) == ("pga", "token-l2", "relative")
    assert c.perturb_place == "pre-ln"
    assert (c.epsilon, c.step_size, c.pga_steps, c.random_direction) == (0.05, 0.05, 2, True)
    smart = distill_glue.parse_args(["--deepspeed", ZERO2, "--perturbation", "smart", "--noise_var", "1e-4"]).objective
    assert (smart.perturbation, smart.noise_var, smart.perturb_norm) == ("smart", 1e-4, "example-l2")
    eps0 = distill_glue.parse_args(["--deepspeed", ZERO2, "--method", "ad2-dkd", "--epsilon", "0"]).objective
    assert eps0.zero_delta and eps0.step_size == 1.0  # the default η (ad2's)
    with pytest.raises(SystemExit):  # a value outside the field's choices: argparse's one line, exit 2
        distill_glue.parse_args(["--deepspeed", ZERO2, "--perturb_norm", "token-l3"])
    with pytest.raises(ValueError, match="smart"):  # smart renormalises to a fixed size: a relative size is refused
        distill_glue.parse_args(["--deepspeed", ZERO2, "--method", "ad2-smart", "--perturb_size", "relative"])


@pytest.mark.parametrize("method", ["ad2", "ad2-paper", "ad2-smart", "ad2-dkd"])
def test_a_preset_is_the_same_from_python_and_the_command_line_and_round_trips(method):
    from ad2_ds.config import PERTURBATION_DEFAULTS, AD2Config
    from recipes import distill_glue

    flags = distill_glue.parse_args(["--deepspeed", ZERO2, "--method", method, "--w_attention", "0"])
    python = RunConfig(deepspeed=ZERO2, objective=AD2Config(method=method, w_attention=0.0))
    assert flags == python
    assert RunConfig.from_dict(json.loads(json.dumps(python.to_dict()))) == python  # results.json's run_config
    obj = python.objective
    if method == "ad2-smart":
        assert (obj.perturbation, obj.perturb_norm, obj.perturb_place) == ("smart", "token-linf", "pre-ln")
        assert obj.noise_var == 1e-5
    elif method == "ad2-paper":  # the paper's literal perturbation
        assert (obj.perturbation, obj.perturb_norm, obj.epsilon, obj.step_size) == ("pga", "example-l2", 1e-5, 1e-3)
    else:  # the ad2 preset (the default method) and a preset that says nothing: the perturbation chosen on dev
        assert {k: getattr(obj, k) for k in PERTURBATION_DEFAULTS} == PERTURBATION_DEFAULTS
        assert (obj.epsilon, obj.step_size) == (1.0, 1.0)
    assert RunConfig().objective.method == "ad2"


def test_the_perturbation_settings_share_a_teacher_cache():
    from recipes.sweep_glue import CACHE_NEUTRAL, cache_tag

    for flag in ("--perturbation", "--perturb_norm", "--perturb_size", "--perturb_place", "--noise_var"):
        assert CACHE_NEUTRAL[flag] == 1, flag
    assert CACHE_NEUTRAL["--random_direction"] == 0
    assert cache_tag(["--perturb_norm", "token-l2", "--random_direction", "--epsilon", "0"]) == ""


def test_a_new_field_gets_its_flag_and_its_cache_meaning_from_metadata():
    import argparse

    from ad2_ds.flags import add_flags, from_flags, setting, teacher_neutral_flags

    @dataclasses.dataclass(frozen=True)
    class Extra:
        gamma: float = setting(0.5, "a new weight", teacher_outputs=False)
        layers: int = setting(2, "changes what the teacher returns")
        fast: bool = setting(True, "", flag="slow")

    p = argparse.ArgumentParser()
    add_flags(p, Extra)
    assert from_flags(Extra, vars(p.parse_args(["--gamma", "2", "--slow"]))) == Extra(gamma=2.0, fast=False)
    assert teacher_neutral_flags(Extra) == {"--gamma": 1}


def test_the_cache_neutral_flags_keep_the_old_hand_kept_list():
    from recipes.sweep_glue import CACHE_NEUTRAL, cache_tag

    old = {"--no_progress": 0, "--keep_zero_stage": 0, "--no_stream_teacher": 0, "--no_group_by_length": 0,
           "--random_start": 0, "--naive_pga": 0, "--eval_steps": 1, "--num_train_epochs": 1, "--max_eval_samples": 1,
           "--temperature": 1, "--alpha": 1, "--epsilon": 1, "--step_size": 1, "--pga_steps": 1}  # fmt: skip
    assert old.items() <= CACHE_NEUTRAL.items()
    for flag in ("--max_seq_length", "--teacher", "--w_hidden", "--layer_map", "--max_train_samples", "--method"):
        assert flag not in CACHE_NEUTRAL, flag
    assert cache_tag(["--epsilon", "1", "--no_progress"]) == ""
    assert cache_tag(["--max_seq_length", "32"]) != ""


def test_config_errors_name_the_field_and_the_command_line_names_its_flag():
    from ad2_ds.cli import error_line

    with pytest.raises(ConfigError) as e:
        RunConfig(deepspeed=ZERO2, student_layers="middle:2")
    assert e.value.field == "student_layers" and error_line(e.value).startswith("error: --student_layers 'middle:2'")
    with pytest.raises(ValueError, match="num_train_epochs"):
        RunConfig(deepspeed=ZERO2, num_train_epochs=0)
    with pytest.raises(ConfigError, match="teacher_cache"):  # the cache holds no attention maps: refused up front
        RunConfig(deepspeed=ZERO2, teacher_cache="/tmp/c", objective=AD2Config(method="ad2-paper"))
    with pytest.raises(ValueError, match="distinct ranks"):
        RunConfig(deepspeed=ZERO2, teacher_ranks=(1, 1))
    assert error_line(ConfigError("progress", "x")) == "error: --no_progress x"


def test_every_deepspeed_patch_still_finds_what_it_patches():
    from ad2_ds import patches

    missing = patches.missing_targets()
    assert missing == {}, f"a DeepSpeed upgrade removed what these patches patch: {missing}"
    patches.TARGETS["probe"] = [("deepspeed.runtime.engine", "DeepSpeedEngine.no_such_attribute_ever")]
    try:
        assert patches.missing_targets() == {
            "probe": ["deepspeed.runtime.engine.DeepSpeedEngine.no_such_attribute_ever"]
        }
    finally:
        del patches.TARGETS["probe"]


def test_a_registered_feature_and_loss_join_the_objective_without_editing_it():
    from ad2_ds import AD2Config, AD2Objective
    from ad2_ds.losses import LOSSES
    from ad2_ds.matching import FEATURES, Feature, MatchSpec, register_feature, register_loss

    register_loss("l1_test", lambda x_s, x_t: (x_s - x_t).abs().mean())
    register_feature("mean_pool_test", Feature("hidden_states", select=lambda h: h.mean(1), masked=False))
    try:
        teacher, student = tiny_bert(seed=1).eval(), tiny_bert(seed=2, layers=1)
        objective = AD2Objective(student, AD2Config(method="kd", w_hidden=1.0), teacher_config=teacher.config)
        objective.use_matches([MatchSpec(2, 1, "mean_pool_test", "l1_test", 0.5)], n_layers_t=2)
        assert objective.teacher_needs().hidden_layers == (2,)
        batch = random_batch()
        with torch.no_grad():
            out_t = teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            )
            out_s = student(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            )
        losses = objective(batch, TeacherOutput(out_t.logits, out_t.hidden_states))
        want = (out_s.hidden_states[1].mean(1) - out_t.hidden_states[2].mean(1)).abs().mean()
        assert torch.allclose(losses["mean_pool_test/1-2"], want, atol=1e-6)
        assert torch.allclose(losses["mean_pool_test"], 0.5 * want, atol=1e-6)
    finally:
        del LOSSES["l1_test"], FEATURES["mean_pool_test"]


def test_run_distillation_from_python_scores_the_best_student_on_the_test_split(
    tmp_path, tiny_vocab, monkeypatch, no_dist_left
):
    import shutil

    from ad2_ds import run_distillation
    from ad2_ds.config import AD2Config
    from ad2_ds.data import tasks
    from ad2_ds.run import summary_table

    data = write_glue_fixture(tmp_path / "glue")
    shutil.copy(data / "SST-2" / "dev.tsv", data / "SST-2" / "test.tsv")  # labelled, in the dev layout
    spec = dataclasses.replace(tasks.get_task("sst2"), name="sst2-with-test", test_split="test", aliases=())
    monkeypatch.setitem(tasks._LOOKUP, tasks._key(spec.name), spec)
    teacher = save_tiny_teacher(tmp_path / "teacher", tiny_vocab)
    ds = json.loads(Path(ZERO2).read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    config = RunConfig(
        deepspeed=ds,
        data=DataConfig(task=spec.name, data_dir=str(data), max_seq_length=16),
        teacher=str(teacher),
        student_layers="bottom:1",
        objective=AD2Config(method="kd"),
        num_train_epochs=1,
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    results = run_distillation(config)
    assert set(results["test"]) == {"accuracy"} and 0.0 <= results["test"]["accuracy"] <= 1.0
    assert results["run_config"] == config.to_dict() and results["args"]["max_seq_length"] == 16
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"] == results["test"]
    table = summary_table(spec, results)
    assert "dev accuracy" in table and "test accuracy" in table
    ckpt = tmp_path / "run" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert RunConfig.from_dict(json.loads(state["run_config"])) == config


def test_a_tp_teacher_saved_as_bin_is_refused_before_any_work(tmp_path):
    from ad2_ds.run import check_run

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    torch.save(tiny_bert().state_dict(), teacher / "pytorch_model.bin")
    config = RunConfig(deepspeed=ZERO2, teacher=str(teacher), teacher_tp_size=2, output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"^teacher .*\.bin weights .* safetensors") as e:
        check_run(config, world_size=2)
    assert e.value.field == "teacher"
    check_run(dataclasses.replace(config, teacher_tp_size=1), world_size=2)  # tp 1 loads it whole: allowed


def test_a_regression_target_of_minus_one_is_a_label():
    import datasets

    from ad2_ds.run_data import labelled as _labelled

    ratings = datasets.Dataset.from_dict({"label": [0.5, -1.0, 2.25]})  # movie-valence's test holds -1.0 ratings
    assert _labelled(ratings, regression=True)
    assert not _labelled(datasets.Dataset.from_dict({"label": [-1.0, -1.0]}), regression=True)  # GLUE's hidden test
    assert not _labelled(datasets.Dataset.from_dict({"label": [0, -1, 1]}))  # a missing class label
    assert _labelled(datasets.Dataset.from_dict({"label": [0, 1, 1]}))
    assert not _labelled(datasets.Dataset.from_dict({"text": ["a"]}))


def test_a_field_added_with_its_old_behaviour_as_default_keeps_existing_caches_valid():
    """A teacher cache's fingerprint holds teacher_settings(): test_from_train (added after caches existed) is left
    out at its default, so a cache built before it is not stale; away from the default it changes the fingerprint."""
    from ad2_ds.run import DataConfig

    plain = RunConfig(deepspeed=ZERO2, data=DataConfig(task="sst2")).teacher_settings()
    carved = RunConfig(deepspeed=ZERO2, data=DataConfig(task="sst2", test_from_train=0.1)).teacher_settings()
    assert "test_from_train" not in plain and carved["test_from_train"] == 0.1
    assert {k: v for k, v in carved.items() if k != "test_from_train"} == plain
    assert "max_train_samples" in plain and "seed" not in plain  # the other markings as before
