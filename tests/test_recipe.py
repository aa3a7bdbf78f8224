"""recipes/distill_glue.py end to end on a tiny GLUE-format fixture and a tiny saved teacher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ad2_ds.dist import find_free_port

from conftest import SPECIAL, WORDS, recipe_rank_loads, save_tiny_teacher, write_glue_fixture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fixture_dirs(tmp_path, tiny_vocab):
    data = write_glue_fixture(tmp_path / "glue")
    teacher = save_tiny_teacher(tmp_path / "teacher", tiny_vocab, layers=2)
    ds = tmp_path / "ds.json"
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 4
    cfg["gradient_accumulation_steps"] = 2
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "run"}
    ds.write_text(json.dumps(cfg))
    return data, teacher, ds


def _argv(data, teacher, ds, out, *extra):
    return [
        "--deepspeed",
        str(ds),
        "--task",
        "sst2",
        "--data_dir",
        str(data),
        "--teacher",
        str(teacher),
        "--student_layers",
        "bottom:1",
        "--max_seq_length",
        "16",
        "--output_dir",
        str(out),
        "--no_progress",
        "--epsilon",
        "1e-3",
        *extra,
    ]


def test_recipe_runs_writes_results_and_a_loadable_student_then_resumes(fixture_dirs, tmp_path, no_dist_left, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipes import distill_glue

    data, teacher, ds = fixture_dirs
    out = tmp_path / "run"
    assert distill_glue.main(_argv(data, teacher, ds, out, "--num_train_epochs", "1", "--eval_steps", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "sst2" and results["method"] == "ad2" and results["world_size"] == 1
    # zero2.json on one rank runs at stage 0: ZeRO would partition nothing (tests/test_deepspeed_api.py: same weights)
    assert results["engine"] == {"micro_batch": 4, "grad_accum": 2, "bf16": False, "fp16": False, "zero_stage": 0}
    assert results["ds_config"]["scheduler"]["params"]["total_num_steps"] == 5  # 40 examples / (4 x 2), resolved
    assert [h["step"] for h in results["history"]] == [2, 4, 5]
    assert "accuracy" in results["best"] and results["samples_per_second"] > 0
    assert "teacher_scores" in results and results["student_params"] < results["teacher_params"]
    student = AutoModelForSequenceClassification.from_pretrained(out / "best")
    tok = AutoTokenizer.from_pretrained(out / "best")
    assert student.config.num_hidden_layers == 1 and student.config.num_labels == 2
    assert student(**tok(["the movie was good"], return_tensors="pt")).logits.shape == (1, 2)
    printed = capsys.readouterr().out
    assert "best student saved to" in printed and "one data-parallel rank: ZeRO stage 2" in printed
    monitor = tmp_path / "monitor" / "run"  # DeepSpeed's monitor gets every loss term and evaluation
    assert {"train_loss.csv", "train_kd.csv", "train_ada.csv", "eval_accuracy.csv"} <= {
        p.name for p in monitor.iterdir()
    }
    assert len((monitor / "eval_accuracy.csv").read_text().strip().splitlines()) == 1 + 3  # header + 3 evaluations

    before = (out / "results.json").read_bytes()
    assert distill_glue.main(_argv(data, teacher, ds, out, "--num_train_epochs", "1")) == 2  # refuses to clobber
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before

    assert (
        distill_glue.main(_argv(data, teacher, ds, out, "--num_train_epochs", "2", "--eval_steps", "2", "--resume"))
        == 0
    )
    resumed = json.loads((out / "results.json").read_text())
    assert [h["step"] for h in resumed["history"]] == [2, 4, 5, 6, 8, 10]


def _final_weights(out):
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return tag, state["module"]


def _run(argv, fault=None, launcher=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if fault:  # through a step callback (tests/fault_run.py), not a variable production code reads
        cmd = (launcher or [sys.executable]) + [str(ROOT / "tests" / "fault_run.py"), "--fault", fault] + argv
    else:
        cmd = (launcher or [sys.executable]) + [str(ROOT / "recipes" / "distill_glue.py")] + argv
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


COMMON = ["--num_train_epochs", "2", "--eval_steps", "2", "--method", "ad2-dkd"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    (tmp / "vocab.txt").write_text("\n".join(SPECIAL + WORDS + [chr(ord("a") + i) for i in range(26)]) + "\n")
    data = write_glue_fixture(tmp / "glue")
    teacher = save_tiny_teacher(tmp / "teacher", tmp / "vocab.txt", layers=2)
    ds = tmp / "ds.json"
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    ds.write_text(json.dumps(cfg))
    full = _run(_argv(data, teacher, ds, tmp / "full", *COMMON))
    assert full.returncode == 0, full.stderr[-2000:]
    return data, teacher, ds, tmp / "full"


@pytest.mark.parametrize(
    "fault, returncode, checkpoint",
    [
        # SIGKILL after 7 micro-steps: the checkpoint of optimizer step 2 (micro-step 4) survives, step 3 is lost
        ("kill@7", -9, "global_step2"),
        # SIGTERM after 5 micro-steps: checkpoint at the next optimizer step (3, micro-step 6), then exit 128+15
        ("term@5", 143, "global_step3"),
    ],
)
def test_fault_then_resume_ends_with_the_same_weights(uninterrupted, tmp_path, fault, returncode, checkpoint):
    data, teacher, ds, full = uninterrupted
    out = tmp_path / "run"
    hit = _run(_argv(data, teacher, ds, out, *COMMON), fault)
    assert hit.returncode == returncode, hit.stderr[-2000:]
    if fault.startswith("term"):
        assert "checkpoint saved" in hit.stderr and "--resume" in hit.stderr
    assert not (out / "results.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == checkpoint
    resumed = _run(_argv(data, teacher, ds, out, *COMMON, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    tag_a, a = _final_weights(full)
    tag_b, b = _final_weights(out)
    assert tag_a == tag_b == "global_step10"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    hist_a = json.loads((full / "results.json").read_text())["history"]
    assert json.loads((out / "results.json").read_text())["history"] == hist_a


def test_recipe_under_the_deepspeed_launcher_on_two_ranks(fixture_dirs, tmp_path):
    data, teacher, ds = fixture_dirs
    out = tmp_path / "two"
    launcher = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(find_free_port()),
    ]
    res = _run(
        _argv(data, teacher, ds, out, "--num_train_epochs", "1", "--teacher_tp_size", "2", "--method", "ad2"),
        launcher=launcher,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["history"]
    assert results["engine"]["zero_stage"] == 2  # two data-parallel ranks: the config's stage
    assert results["teacher_load"] == "shards"  # teacher_tp_size 2: DeepSpeedTeacher.from_pretrained, shard by shard
    assert (out / "best" / "model.safetensors").is_file()


def test_recipe_with_a_teacher_cache_and_a_given_student(fixture_dirs, tmp_path, tiny_vocab, no_dist_left, capsys):
    from recipes import distill_glue

    from conftest import save_tiny_teacher

    data, teacher, ds = fixture_dirs
    student = save_tiny_teacher(tmp_path / "student", tiny_vocab, layers=1)  # any HF checkpoint can be the student
    cache = tmp_path / "cache"
    args = ["--num_train_epochs", "1", "--teacher_cache", str(cache), "--method", "ad2-paper", "--w_attention", "0",
            "--student", str(student), "--keep_zero_stage"]  # fmt: skip
    assert distill_glue.main(_argv(data, teacher, ds, tmp_path / "a", *args)) == 0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["hidden_layers"] == [0, 2]  # uniform map 1 student layer -> teacher layer 2, plus the embeddings
    stamp = (cache / "meta.json").stat().st_mtime_ns
    assert distill_glue.main(_argv(data, teacher, ds, tmp_path / "b", *args)) == 0
    assert (cache / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["history"] == b["history"]  # same seed, same cached targets: the same run
    # down to the weights: building the cache (run a) must not move the RNG the student's dropout draws from
    weights_a, weights_b = (_final_weights(tmp_path / run)[1] for run in "ab")
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert a["engine"]["zero_stage"] == 2  # --keep_zero_stage
    phases = {"load_and_augment_data", "evaluate_teacher_and_latency", "objective_and_engine", "teacher"}
    assert set(a["setup_seconds"]) == phases and all(v >= 0 for v in a["setup_seconds"].values())
    # a cache built for other inputs is refused with one line, and left as it was
    stale = _argv(data, teacher, ds, tmp_path / "c", *args)
    stale[stale.index("--max_seq_length") + 1] = "12"
    assert distill_glue.main(stale) == 2
    assert "stale cache" in capsys.readouterr().err and (cache / "meta.json").stat().st_mtime_ns == stamp


def test_text_editing_baseline_distils_on_the_originals_and_their_copies(fixture_dirs, tmp_path, no_dist_left):
    from recipes import distill_glue

    from conftest import write_tiny_wordnet

    data, teacher, ds = fixture_dirs
    wordnet = write_tiny_wordnet(tmp_path / "wordnet")
    cache = tmp_path / "cache"
    args = ["--num_train_epochs", "1", "--method", "kd", "--teacher_cache", str(cache), "--augment_copies", "2",
            "--augment_alpha", "0.5", "--wordnet_dir", str(wordnet)]  # fmt: skip
    assert distill_glue.main(_argv(data, teacher, ds, tmp_path / "a", *args)) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    assert a["train_examples"] == 3 * 40  # the fixture's 40 sentences and 2 copies of each
    assert json.loads((cache / "meta.json").read_text())["num_examples"] == 3 * 40  # the teacher labels the copies
    plain = ["--num_train_epochs", "1", "--method", "kd"]
    assert distill_glue.main(_argv(data, teacher, ds, tmp_path / "b", *plain)) == 0
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert b["train_examples"] == 40 and a["history"][-1]["step"] == 3 * b["history"][-1]["step"]


def test_teacher_and_student_with_different_tokenizers(fixture_dirs, tmp_path, tiny_vocab, no_dist_left, capsys):
    from recipes import distill_glue

    data, _, ds = fixture_dirs
    # the teacher's vocabulary lists the same words in another order: same text, other ids
    lines = tiny_vocab.read_text().split()
    other = tmp_path / "other_vocab.txt"
    other.write_text("\n".join(lines[:5] + lines[5:][::-1]) + "\n")
    teacher = save_tiny_teacher(tmp_path / "teacher_other", other, layers=2)
    student = save_tiny_teacher(tmp_path / "student", tiny_vocab, layers=1)
    out = tmp_path / "cross"
    args = ["--num_train_epochs", "1", "--student", str(student), "--method", "ad2-dkd"]
    assert distill_glue.main(_argv(data, teacher, ds, out, *args)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["history"] and "accuracy" in results["teacher_scores"]
    # deep KD compares token positions: refused up front with one line
    deep = ["--student", str(student), "--method", "ad2-paper"]
    assert distill_glue.main(_argv(data, teacher, ds, tmp_path / "deep", *deep)) == 2
    assert "tokenizers differ" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()


def _recipe_rank(rank, world_size, argv):
    from recipes import distill_glue

    return distill_glue.main(argv)


def test_hosted_teacher_on_rank0_trains_like_colocated_on_two_ranks_then_resumes(fixture_dirs, tmp_path):
    from ad2_ds.testing import launch

    data, teacher, ds = fixture_dirs
    common = ["--num_train_epochs", "1", "--eval_steps", "2", "--method", "ad2-dkd"]
    colocated, hosted = tmp_path / "colocated", tmp_path / "hosted"
    assert launch(_recipe_rank, 2, args=(_argv(data, teacher, ds, colocated, *common),), timeout_s=300) == [0, 0]
    argv = _argv(data, teacher, ds, hosted, *common, "--teacher_ranks", "0")
    ranks = launch(recipe_rank_loads, 3, args=(argv,), timeout_s=300)
    assert [rc for rc, _ in ranks] == [0, 0, 0]
    assert str(teacher) in ranks[0][1]  # the teacher rank loads it; the student ranks never build it: they cut the
    assert all(str(teacher) not in loaded for _, loaded in ranks[1:])  # student from its tensors, score it remotely
    res_c = json.loads((colocated / "results.json").read_text())
    res_h = json.loads((hosted / "results.json").read_text())
    assert res_h["world_size"] == 2 and res_h["teacher_ranks"] == [0] and res_c["teacher_ranks"] == []
    assert res_h["history"] == res_c["history"] and [h["step"] for h in res_h["history"]] == [2, 3]
    assert res_h["teacher_scores"] == res_c["teacher_scores"]  # scored through the hosted teacher: the same
    assert res_h["teacher_params"] == res_c["teacher_params"]
    tag_c, w_c = _final_weights(colocated)
    tag_h, w_h = _final_weights(hosted)  # `latest` written although global rank 0 is the teacher
    assert tag_c == tag_h == "global_step3"
    assert w_c.keys() == w_h.keys() and all(torch.equal(w_c[k], w_h[k]) for k in w_c)  # same training, bit for bit

    # resume the hosted run for a second epoch: DeepSpeed's checkpoint loading runs on the student ranks alone
    more = ["--num_train_epochs", "2", "--eval_steps", "2", "--method", "ad2-dkd", "--resume"]
    argv = _argv(data, teacher, ds, hosted, *more, "--teacher_ranks", "0")
    assert launch(_recipe_rank, 3, args=(argv,), timeout_s=300) == [0, 0, 0]
    resumed = json.loads((hosted / "results.json").read_text())
    assert [h["step"] for h in resumed["history"]] == [2, 3, 4, 6]
    assert _final_weights(hosted)[0] == "global_step6"


def test_hosted_teacher_without_safetensors_is_loaded_whole_on_the_student_ranks(fixture_dirs, tmp_path):
    """A .bin teacher cannot be read tensor by tensor: the student ranks fall back to loading it whole (and warn);
    the run is the same as with the safetensors folder."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    from ad2_ds.testing import launch

    data, teacher, ds = fixture_dirs
    pickled = tmp_path / "teacher-bin"
    shutil.copytree(teacher, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = AutoModelForSequenceClassification.from_pretrained(teacher).state_dict()
    torch.save(weights, pickled / "pytorch_model.bin")  # what older transformers wrote
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    common = ["--num_train_epochs", "1", "--method", "ad2-dkd", "--teacher_ranks", "0"]
    runs = {}
    for name, folder in (("safe", teacher), ("bin", pickled)):
        ranks = launch(recipe_rank_loads, 3, args=(_argv(data, folder, ds, tmp_path / name, *common),), timeout_s=300)
        assert [rc for rc, _ in ranks] == [0, 0, 0]
        runs[name] = [str(folder) in loaded for _, loaded in ranks]
    assert runs == {"safe": [True, False, False], "bin": [True, True, True]}
    res = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in runs}
    assert res["bin"]["history"] == res["safe"]["history"]
    assert res["bin"]["teacher_scores"] == res["safe"]["teacher_scores"]


def test_hosted_tp2_teacher_on_ranks_0_1_students_2_3(fixture_dirs, tmp_path):
    from ad2_ds.testing import launch

    data, teacher, ds = fixture_dirs
    common = ["--num_train_epochs", "1", "--method", "ad2-dkd", "--w_attention", "1"]  # hidden states + attentions
    colocated, hosted = tmp_path / "colocated", tmp_path / "hosted"
    assert launch(_recipe_rank, 2, args=(_argv(data, teacher, ds, colocated, *common),), timeout_s=300) == [0, 0]
    argv = _argv(data, teacher, ds, hosted, *common, "--teacher_ranks", "0,1")
    ranks = launch(recipe_rank_loads, 4, args=(argv,), timeout_s=300)
    assert [rc for rc, _ in ranks] == [0] * 4
    assert all(str(teacher) not in loaded for _, loaded in ranks)  # teacher ranks: shard by shard; students: never
    res = json.loads((hosted / "results.json").read_text())
    res_c = json.loads((colocated / "results.json").read_text())
    assert res["world_size"] == 2 and res["teacher_ranks"] == [0, 1] and res["teacher_load"] == "hosted"
    assert res["teacher_scores"].keys() == res_c["teacher_scores"].keys()
    assert abs(res["teacher_scores"]["accuracy"] - res_c["teacher_scores"]["accuracy"]) < 1e-9
    _, w_c = _final_weights(colocated)
    _, w_h = _final_weights(hosted)
    for k in w_c:  # a TP teacher equals the unsharded one up to fp32 rounding (~1e-8)
        torch.testing.assert_close(w_h[k], w_c[k], atol=1e-5, rtol=1e-4)


def test_teacher_ranks_usage_errors(fixture_dirs, tmp_path, capsys, monkeypatch):
    from recipes import distill_glue

    data, teacher, ds = fixture_dirs
    for world, extra, msg in (
        ("1", ["--teacher_ranks", "1"], "distinct ranks"),
        ("1", ["--teacher_ranks", "0"], "need teacher and student ranks"),
        ("3", ["--teacher_ranks", "0,1"], "not a multiple"),
        ("3", ["--teacher_ranks", "0", "--teacher_tp_size", "2"], "tensor-parallel over those ranks"),
        ("3", ["--teacher_ranks", "0", "--method", "finetune"], "uses no teacher"),
    ):
        monkeypatch.setenv("WORLD_SIZE", world)  # checked before any process group exists
        assert distill_glue.main(_argv(data, teacher, ds, tmp_path / "x", *extra)) == 2
        assert msg in capsys.readouterr().err


class _Evil:
    """Unpickling this runs a command: what a tampered checkpoint could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_checkpoint_that_would_run_code(fixture_dirs, tmp_path, no_dist_left, capsys):
    from recipes import distill_glue

    data, teacher, ds = fixture_dirs
    out = tmp_path / "run"
    assert distill_glue.main(_argv(data, teacher, ds, out, "--num_train_epochs", "1")) == 0
    tag = (out / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "pwned"
    torch.save({"module": _Evil(marker)}, out / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    assert distill_glue.main(_argv(data, teacher, ds, out, "--num_train_epochs", "2", "--resume")) == 2
    assert "refused to unpickle" in capsys.readouterr().err
    assert not marker.exists()


def test_sigterm_on_one_rank_stops_both_at_a_checkpoint_then_resumes(uninterrupted, tmp_path):
    data, teacher, ds, _ = uninterrupted
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port"]
    full = _run(_argv(data, teacher, ds, tmp_path / "full2", *COMMON), launcher=launcher + [str(find_free_port())])
    assert full.returncode == 0, full.stderr[-2000:]
    # only rank 0 gets SIGTERM after 3 micro-steps; rank 1 learns it through the per-step flag all-reduce
    out = tmp_path / "term2"
    hit = _run(_argv(data, teacher, ds, out, *COMMON), "term@3:0", launcher + [str(find_free_port())])
    assert hit.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step2"  # the next optimizer step
    resumed = _run(_argv(data, teacher, ds, out, *COMMON, "--resume"), launcher=launcher + [str(find_free_port())])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    tag_a, a = _final_weights(tmp_path / "full2")
    tag_b, b = _final_weights(out)
    assert tag_a == tag_b and all(torch.equal(a[k], b[k]) for k in a)


def test_default_teacher_is_shared_by_student_seeds(monkeypatch, tmp_path):
    """A sweep over --seed must distil from one default teacher, not fine-tune one per student seed."""
    from ad2_ds import default_teacher
    from ad2_ds.data.tasks import get_task
    from ad2_ds.default_teacher import default_teacher_dir
    from recipes import distill_glue

    monkeypatch.setenv("AD2_CACHE", str(tmp_path))
    task = get_task("movie-polarity")
    base = ["--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]
    dirs = {s: default_teacher_dir(distill_glue.parse_args(base + ["--seed", s]), task) for s in ("42", "43")}
    assert dirs["42"] == dirs["43"] and dirs["42"].endswith("-s42")
    assert "movie-polarity-splitv2-" in dirs["42"]  # trained on the v2 train split, which holds no test example
    other = default_teacher_dir(distill_glue.parse_args(base + ["--seed", "43", "--teacher_seed", "7"]), task)
    assert other.endswith("-s7")
    glue = ["--task", "sst2"]
    whole, carved = (default_teacher_dir(distill_glue.parse_args(base + glue + f), get_task("sst2"))
                     for f in ([], ["--test_from_train", "0.1"]))  # fmt: skip
    assert carved == whole + "-test0.1"  # a teacher fine-tuned on all of train never meets a carved test split
    ft = default_teacher.finetune_config(distill_glue.parse_args(base + glue + ["--test_from_train", "0.1"]), "x", {})
    assert ft.data.test_from_train == 0.1


_HOLD_THEN_FINISH = """
import fcntl, os, sys, time
target = sys.argv[1]
os.makedirs(os.path.dirname(target), exist_ok=True)
lock = open(target + ".lock", "a")
fcntl.flock(lock, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(2)
os.makedirs(target)
open(os.path.join(target, "config.json"), "w").write("{}")
"""  # another run fine-tuning the default teacher: it holds the lock, then leaves a finished teacher


def test_a_run_waits_for_the_default_teacher_another_run_is_fine_tuning_then_reuses_it(
    monkeypatch, tmp_path, no_dist_left, capsys
):
    """Two runs of a sweep started together on a fresh machine: the second waits for the first one's fine-tuning
    (it used to fine-tune the same teacher into the same folder at the same time), then reuses the teacher."""
    from ad2_ds import default_teacher, distill
    from ad2_ds.data.tasks import get_task
    from ad2_ds.dist import init_distributed
    from recipes import distill_glue

    monkeypatch.setenv("AD2_CACHE", str(tmp_path))
    config = distill_glue.parse_args(["--deepspeed", str(ROOT / "ds_configs" / "zero2.json")])
    task = get_task("movie-polarity")
    target = default_teacher.default_teacher_dir(config, task)
    other = subprocess.Popen([sys.executable, "-c", _HOLD_THEN_FINISH, target], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "held"

    def fine_tune_again(*args, **kwargs):
        raise AssertionError("fine-tuned the teacher another run is fine-tuning")

    monkeypatch.setattr(distill, "run_with_teacher", fine_tune_again)
    init_distributed()
    assert default_teacher.ensure_default_teacher(config, task, {}) == target
    assert other.wait(timeout=60) == 0
    out = capsys.readouterr().out
    assert "another process holds" in out and f"teacher: reusing {target}" in out


def test_default_teacher_is_fine_tuned_once_outside_the_students_monitor(
    fixture_dirs, tmp_path, monkeypatch, no_dist_left, capsys
):
    from ad2_ds import default_teacher
    from recipes import distill_glue

    data, base_model, ds = fixture_dirs
    monkeypatch.setenv("AD2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_teacher, "DEFAULT_MODEL", str(base_model))  # stands in for all-MiniLM-L6-v2
    argv = _argv(data, base_model, ds, tmp_path / "s42", "--num_train_epochs", "1", "--teacher_epochs", "1")
    del argv[argv.index("--teacher") : argv.index("--teacher") + 2]
    assert distill_glue.main(argv) == 0
    assert "teacher: fine-tuning" in capsys.readouterr().out
    teachers = list((tmp_path / "cache" / "teachers").rglob("config.json"))  # the stand-in's path is in the key
    assert len(teachers) == 1 and "-s42" in teachers[0].parent.name
    for csv_file in (tmp_path / "monitor").rglob("train_*.csv"):  # the student's losses only: one header
        assert csv_file.read_text().count("step,") == 1, csv_file
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "s43")
    assert distill_glue.main(argv + ["--seed", "43"]) == 0
    assert "teacher: reusing" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "teachers").rglob("config.json")) == teachers


def test_a_glue_task_gets_a_labelled_test_split_carved_from_train(fixture_dirs, tmp_path, no_dist_left):
    """--test_from_train: a fixed hash-chosen part of GLUE's train becomes a labelled test split; the student is chosen
    on dev and scored once on it, the teacher too, and no test example is trained on."""
    import datasets

    from ad2_ds.data.glue import carve_test_split, load_task
    from ad2_ds.data.tasks import get_task
    from ad2_ds.run import DataConfig, load_data
    from recipes import distill_glue

    data, teacher, ds = fixture_dirs
    raw = load_task(get_task("sst2"), str(data))
    carved = carve_test_split(datasets.DatasetDict(raw), 0.25)
    assert 0 < len(carved["test"]) < len(raw["train"])
    task, splits = load_data(DataConfig(task="sst2", data_dir=str(data), test_from_train=0.25), rank_zero_first=False)
    assert task.test_split == "test" and splits["test"]["text_a"] == carved["test"]["text_a"]
    assert not set(splits["train"]["text_a"]) & set(splits["test"]["text_a"])  # duplicates stay on one side
    assert len(splits["train"]) + len(splits["test"]) == len(raw["train"])
    assert get_task("sst2").test_split is None  # the registry's spec is untouched

    out = tmp_path / "run"
    argv = _argv(data, teacher, ds, out, "--num_train_epochs", "1", "--method", "kd", "--test_from_train", "0.25")
    assert distill_glue.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["train_examples"] == len(carved["train"])
    assert set(results["test"]) >= {"accuracy"} and set(results["teacher_test"]) >= {"accuracy"}
    assert results["run_config"]["data"]["test_from_train"] == 0.25
