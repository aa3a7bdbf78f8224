"""The radius schedule (--epsilon_schedule): ε and η at given steps, the plateau's growth, the objective reading them,
and a scheduled run killed and resumed ending equal to an uninterrupted one."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ad2_ds import AD2Config, AD2Objective
from ad2_ds.perturb import per_example_norm
from ad2_ds.schedule import RadiusSchedule
from ad2_ds.teachers.base import TeacherOutput

from conftest import SPECIAL, WORDS, random_batch, save_tiny_teacher, tiny_bert, write_ds_config, write_glue_fixture

ROOT = Path(__file__).resolve().parents[1]


def _argv(data, teacher, ds, out, *extra):  # tests/test_recipe.py's run
    return ["--deepspeed", str(ds), "--task", "sst2", "--data_dir", str(data), "--teacher", str(teacher),
            "--student_layers", "bottom:1", "--max_seq_length", "16", "--output_dir", str(out), "--no_progress",
            "--epsilon", "1e-3", *extra]  # fmt: skip


def _run(argv, fault=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    script = ["tests/fault_run.py", "--fault", fault] if fault else ["recipes/distill_glue.py"]
    cmd = [sys.executable, str(ROOT / script[0]), *script[1:], *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _final_weights(out):
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return tag, state["module"]


def test_linear_schedule_hits_start_and_end_exactly_and_eta_keeps_its_ratio():
    cfg = AD2Config(epsilon_schedule="linear", epsilon=0.5, step_size=1.0, epsilon_end=2.0)
    assert cfg.step_size_end == 4.0  # filled (and saved with the config): η / ε = 2 all along
    s = RadiusSchedule(cfg, total_steps=5)
    assert [s.at(t) for t in range(5)] == [(0.5, 1.0), (0.875, 1.75), (1.25, 2.5), (1.625, 3.25), (2.0, 4.0)]
    assert s.at(7) == (2.0, 4.0)  # past the end: the end value
    odd = RadiusSchedule(AD2Config(epsilon_schedule="linear", epsilon=0.1, epsilon_end=0.3, step_size_end=0.7), 3)
    assert odd.at(0) == (0.1, 1.0) and odd.at(2) == (0.3, 0.7)  # exact, where 0.1 + (0.3 - 0.1) is not 0.3


def test_cosine_schedule_values_by_hand():
    cfg = AD2Config(epsilon_schedule="cosine", epsilon=1.0, step_size=1.0, epsilon_end=0.0, step_size_end=0.5)
    s = RadiusSchedule(cfg, total_steps=5)
    # t = step / 4; s = (1 - cos(pi t)) / 2: 0, (1 - sqrt(2)/2) / 2, 1/2, (1 + sqrt(2)/2) / 2, 1
    quarter = (1 - math.sqrt(2) / 2) / 2
    expected = [(1.0, 1.0), (1 - quarter, 1 - quarter / 2), (0.5, 0.75), (quarter, 0.5 + quarter / 2), (0.0, 0.5)]
    got = [s.at(t) for t in range(5)]
    assert got[0] == expected[0] and got[-1] == expected[-1]  # the ends exactly
    for (e, eta), (e_want, eta_want) in zip(got, expected):
        assert e == pytest.approx(e_want, abs=1e-15) and eta == pytest.approx(eta_want, abs=1e-15)


def test_constant_schedule_is_the_config_at_every_step():
    s = RadiusSchedule(AD2Config(epsilon=0.3, step_size=0.2), total_steps=10)
    assert {s.at(t) for t in range(10)} == {(0.3, 0.2)}
    assert not s.observe(5.0, 0)


def _plateau(patience=3, smoothing=0.0, **kw):
    cfg = AD2Config(
        epsilon_schedule="plateau", epsilon=1.0, step_size=0.5, epsilon_end=3.0, plateau_patience=patience,
        plateau_factor=2.0, plateau_smoothing=smoothing, **kw,
    )  # fmt: skip
    return RadiusSchedule(cfg, total_steps=100)


def test_plateau_grows_after_exactly_patience_steps_without_improvement_and_caps():
    s = _plateau(patience=3)
    assert s.at(0) == (1.0, 0.5)
    # 5 (best), 4 (best), then 4, 4.5: two steps without a new best; 3.9 improves and resets the count
    assert [s.observe(v, step) for step, v in enumerate([5.0, 4.0, 4.0, 4.5, 3.9], 1)] == [False] * 5
    assert s.bad_steps == 0 and s.at(6) == (1.0, 0.5)
    assert [s.observe(v, step) for step, v in enumerate([3.9, 4.0, 3.95], 6)] == [False, False, True]
    assert s.grown_at == [8] and s.at(9) == (2.0, 1.0)  # ε and η doubled (η's cap: 0.5 * 3 / 1 = 1.5)
    assert s.best is None and s.bad_steps == 0  # a new stage: the larger radius's loss is on another scale
    # the first value after a growth is the new best, whatever the old best was
    assert [s.observe(v, step) for step, v in enumerate([9.0, 9.0, 9.0, 9.0], 9)] == [False, False, False, True]
    assert s.grown_at == [8, 12] and s.at(13) == (3.0, 1.5)  # 4 and 2 capped at epsilon_end and step_size_end
    assert s.capped and not any(s.observe(9.0, step) for step in range(13, 30))  # no growth beyond the cap
    assert s.grown_at == [8, 12]


def test_plateau_watches_a_running_mean():
    s = _plateau(patience=1, smoothing=0.5)
    s.observe(4.0, 1)  # r = 4
    s.observe(2.0, 2)  # r = 3: improves
    assert s.running == 3.0 and s.best == 3.0
    assert not s.observe(2.5, 3)  # r = 2.75 < 3 although 2.5 > 2: the mean improves
    assert s.observe(3.5, 4)  # r = 3.125: not below 2.75 -> one step without improvement, patience 1: grows
    assert s.grown_at == [4] and s.running is None


def test_plateau_state_round_trips_through_json():
    s = _plateau(patience=2, smoothing=0.9)
    for step, v in enumerate([3.0, 2.7182818284590455, 2.9, 2.8, 1.1], 1):
        s.observe(v, step)
    restored = _plateau(patience=2, smoothing=0.9)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.state_dict() == s.state_dict()
    for step, v in enumerate([1.2, 1.3, 0.7, 0.8, 0.9], 6):  # both continue alike, bit for bit
        assert restored.observe(v, step) == s.observe(v, step)
    assert restored.state_dict() == s.state_dict() and restored.at(11) == s.at(11)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon_schedule="linear", epsilon_end=-0.5), "cannot end below zero"),
        (dict(epsilon_end=0.5), "epsilon_schedule is constant"),
        (dict(step_size_end=0.5), "epsilon_schedule is constant"),
        (dict(epsilon_schedule="exponential"), "epsilon_schedule must be one of"),
        (dict(epsilon_schedule="cosine"), "needs --epsilon_end"),
        (dict(epsilon_schedule="linear", epsilon=0.0, epsilon_end=1.0), "needs --step_size_end"),
        (dict(epsilon_schedule="linear", epsilon_end=1.0, step_size_end=0.0), "step_size_end must be > 0"),
        (dict(epsilon_schedule="linear", epsilon_end=2.0, plateau_patience=5), "is for epsilon_schedule plateau"),
        (dict(method="kd", epsilon_schedule="linear", epsilon_end=2.0), "no adversarial term"),
        (dict(method="ad2-smart", epsilon_schedule="linear", epsilon_end=2.0), "smart has none"),
        (dict(epsilon_schedule="plateau", epsilon_end=0.5), "must exceed epsilon"),
        (dict(epsilon_schedule="plateau", epsilon=0.0, epsilon_end=1.0, step_size_end=1.0), "epsilon > 0"),
        (dict(epsilon_schedule="plateau", epsilon_end=2.0, plateau_factor=1.0), "plateau_factor must be > 1"),
        (dict(epsilon_schedule="plateau", epsilon_end=2.0, plateau_patience=0), "plateau_patience must be"),
        (dict(epsilon_schedule="plateau", epsilon_end=2.0, plateau_smoothing=1.0), "plateau_smoothing must be"),
        (dict(epsilon_schedule="plateau", epsilon_end=2.0, plateau_monitor="acc"), "plateau_monitor must be"),
        (dict(method="ad2-kd", epsilon_schedule="plateau", epsilon_end=2.0, plateau_monitor="kd"), "is not computed"),
    ],
)
def test_bad_schedule_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AD2Config(**kwargs)


def test_the_objective_uses_the_radius_it_is_given():
    teacher, batch = tiny_bert(seed=1, layers=4), random_batch(batch_size=6, seq_len=10)
    with torch.no_grad():
        logits = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    t = TeacherOutput(logits * 20.0, None, None)

    def delta(cfg, radius=None):
        obj = AD2Objective(tiny_bert(seed=2), cfg, teacher.config)
        if radius:
            obj.set_radius(*radius)
        torch.manual_seed(0)
        obj(batch, t)
        return obj.last_delta

    scheduled = AD2Config(epsilon_schedule="linear", epsilon=1.0, step_size=1.0, epsilon_end=0.25)
    small = delta(scheduled, radius=(0.25, 0.25))
    assert torch.equal(small, delta(AD2Config(epsilon=0.25, step_size=0.25)))  # what a config ε of 0.25 gives
    assert per_example_norm(small).max() <= 0.25 + 1e-6 < per_example_norm(delta(scheduled)).max()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sched")
    (tmp / "vocab.txt").write_text("\n".join(SPECIAL + WORDS + [chr(ord("a") + i) for i in range(26)]) + "\n")
    data = write_glue_fixture(tmp / "glue")
    teacher = save_tiny_teacher(tmp / "teacher", tmp / "vocab.txt", layers=2)
    ds = write_ds_config(tmp / "ds.json", train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    return tmp, data, teacher, ds


# ε from 1e-3 (the recipe tests' --epsilon), doubling whenever the adversarial loss of a step is not a new best
PLATEAU = ["--num_train_epochs", "2", "--eval_steps", "2", "--epsilon_schedule", "plateau", "--epsilon_end", "0.5",
           "--plateau_patience", "1", "--plateau_smoothing", "0", "--plateau_monitor", "ada"]  # fmt: skip


def test_plateau_run_killed_then_resumed_ends_equal_to_an_uninterrupted_one(world):
    tmp, data, teacher, ds = world
    monitored = tmp / "monitored.json"  # the uninterrupted run alone writes the DeepSpeed monitor's csv files
    csv = {"enabled": True, "output_path": str(tmp / "monitor"), "job_name": "run"}
    monitored.write_text(json.dumps({**json.loads(ds.read_text()), "csv_monitor": csv}))
    full = _run(_argv(data, teacher, monitored, tmp / "full", *PLATEAU))
    assert full.returncode == 0, full.stderr[-2000:]
    results = json.loads((tmp / "full" / "results.json").read_text())
    assert results["config"]["epsilon_schedule"] == "plateau"
    assert results["config"]["step_size_end"] == pytest.approx(500.0)  # η = 1 keeps its ratio to ε: 1 x 0.5 / 1e-3
    grown = results["schedule"]["grown_at"]
    # the run is informative: ε grew before the checkpoint the kill leaves (step 8) and after it
    assert grown and grown[0] <= 8 < grown[-1], grown
    assert results["schedule"]["epsilon"] == min(1e-3 * 2 ** len(grown), 0.5)
    eps_log = (tmp / "monitor" / "run" / "train_epsilon.csv").read_text().strip().splitlines()[1:]
    used = [float(line.split(",")[1]) for line in eps_log]
    assert len(used) == 10 and used[0] == 1e-3 and used[grown[0]] == 2e-3  # ε each step used, grown after grown[0]

    out = tmp / "killed"
    hit = _run(_argv(data, teacher, ds, out, *PLATEAU), "kill@17")  # in step 9: the checkpoint of step 8 survives
    assert hit.returncode == -9 and (out / "checkpoints" / "latest").read_text().strip() == "global_step8"
    resumed = _run(_argv(data, teacher, ds, out, *PLATEAU, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    tag_a, a = _final_weights(tmp / "full")
    tag_b, b = _final_weights(out)
    assert tag_a == tag_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    again = json.loads((out / "results.json").read_text())
    assert again["schedule"] == results["schedule"] and again["history"] == results["history"]


def test_a_schedule_that_stays_put_trains_bit_for_bit_like_the_constant_radius(world, no_dist_left):
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    common = ["--num_train_epochs", "1", "--step_size", "2e-3"]
    assert distill_glue.main(_argv(data, teacher, ds, tmp / "constant", *common)) == 0
    flat = ["--epsilon_schedule", "linear", "--epsilon_end", "1e-3"]  # through the callback, ε set every step
    assert distill_glue.main(_argv(data, teacher, ds, tmp / "flat", *common, *flat)) == 0
    _, a = _final_weights(tmp / "constant")
    _, b = _final_weights(tmp / "flat")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp / d / "results.json").read_text()) for d in ("constant", "flat"))
    assert ra["history"] == rb["history"] and "schedule" not in ra and rb["schedule"]["epsilon"] == 1e-3


def test_the_loops_that_run_no_schedule_refuse_one_in_one_line(tmp_path, capsys):
    from ad2_ds.schedule import require_constant
    from recipes import distill_accelerate

    require_constant(AD2Config(), "here")  # constant: nothing to refuse
    argv = ["--train_file", str(tmp_path / "none.csv"), "--validation_file", str(tmp_path / "none.csv"),
            "--teacher", str(tmp_path), "--output_dir", str(tmp_path / "out"),
            "--epsilon_schedule", "cosine", "--epsilon_end", "0.5"]  # fmt: skip
    assert distill_accelerate.main(argv) == 2  # before its data (missing here) is read
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: epsilon_schedule cosine: recipes/distill_accelerate.py runs a constant epsilon; schedules "
                   "run in recipes/distill_glue.py"]  # fmt: skip
    with pytest.raises(ValueError, match="AD2Trainer runs a constant epsilon"):
        from ad2_ds.hf import AD2Trainer

        AD2Trainer(tiny_bert(), ad2_config=AD2Config(epsilon_schedule="linear", epsilon_end=2.0))


def test_plateau_on_two_ranks_reduces_the_watched_loss_and_finishes(world):
    from ad2_ds.dist import find_free_port

    tmp, data, teacher, ds = world
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(find_free_port()), str(ROOT / "recipes" / "distill_glue.py")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp / "two"
    res = subprocess.run(launcher + _argv(data, teacher, ds, out, *PLATEAU), env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["schedule"]["grown_at"]  # the reduced loss made ε grow
