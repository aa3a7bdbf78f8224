"""Several teachers (``--teacher A --teacher B``): the settings checked before any model loads, the ensemble's
target, and runs through the run layer on tiny models."""

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_bert


def _argv(data, ds, out, *extra):
    return ["--deepspeed", str(ds), "--task", "sst2", "--data_dir", str(data), "--student_layers", "bottom:1",
            "--max_seq_length", "16", "--output_dir", str(out), "--no_progress", "--num_train_epochs", "1",
            "--max_train_samples", "16", *extra]  # fmt: skip


def _second_teacher(path, vocab, num_labels=2, seed=2, id2label=None):
    from transformers import BertTokenizer

    model = tiny_bert(num_labels=num_labels, seed=seed)
    if id2label:
        model.config.id2label = dict(enumerate(id2label))
        model.config.label2id = {n: i for i, n in enumerate(id2label)}
    model.save_pretrained(path)
    BertTokenizer(vocab=str(vocab)).save_pretrained(path)
    return path


BAD = {
    "weights of the wrong count": (["--teacher_weights", "1,2,3"], "--teacher_weights"),
    "a negative weight": (["--teacher_weights=-1,2"], "must be >= 0"),
    "all weights zero": (["--teacher_weights", "0,0"], "all 0"),
    "tp sizes of the wrong count": (["--teacher_tp_size", "1,1,1"], "--teacher_tp_size has 3 values for 2"),
    "dtypes of the wrong count": (["--teacher_dtype", "fp32,bf16,fp32"], "--teacher_dtype has 3 values"),
    "caches of the wrong count": (["--teacher_cache", "a,b,c"], "--teacher_cache has 3 values"),
    "one cache for two teachers": (["--teacher_cache", "a"], "one folder per teacher"),
    "deep KD without a source": (["--w_hidden", "1"], "--hidden_source_teacher"),
    "a source that is no member": (["--w_hidden", "1", "--hidden_source_teacher", "7"], "none of the teachers"),
    "one rank group for two teachers": (["--teacher_ranks", "0"], "one rank group per teacher, separated by '/'"),
    "rank groups of the wrong count": (["--teacher_ranks", "0/1/2"], "3 rank groups for 2 teachers"),
    "a rank hosting two members": (["--teacher_ranks", "0/0"], "every rank hosts one member at most"),
    "no student rank left": (["--teacher_ranks", "0/"], "need teacher and student ranks"),
    "a cached member beside a hosted one": (["--teacher_ranks", "0/", "--teacher_cache", ",c"], "not supported yet"),
    "no teacher used": (["--method", "finetune"], "uses no teacher"),
    "other label count": ("three labels", "labels"),
    "other label order": ("swapped names", "same labels in the same order"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_ensemble_settings_get_one_line_before_any_model_loads(world, tiny_vocab, case, capsys, monkeypatch,
                                                                   no_dist_left):  # fmt: skip
    from ad2_ds import distill
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    extra, expected = BAD[case]
    second = {"three labels": dict(num_labels=3), "swapped names": dict(id2label=["positive", "negative"])}
    if isinstance(extra, str):
        kw = second[extra]
        # the first teacher names its labels too, so that an order can differ
        from transformers import AutoModelForSequenceClassification

        first = AutoModelForSequenceClassification.from_pretrained(teacher)
        first.config.id2label, first.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
        first.save_pretrained(teacher)
        extra = []
    else:
        kw = {}
    t2 = _second_teacher(tmp / "teacher2", tiny_vocab, **kw)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(distill, "load_models", no_loading)
    t0 = time.perf_counter()
    code = distill_glue.main(_argv(data, ds, tmp / "out", "--teacher", str(teacher), "--teacher", str(t2), *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ") and expected in err[-1], err[-3:]
    assert len(err[-1]) < 400
    assert time.perf_counter() - t0 < 30
    assert not (tmp / "out" / "results.json").exists()


def test_the_confidence_rule_is_refused_for_a_regression_before_any_model_loads():
    from types import SimpleNamespace

    from ad2_ds.config import ConfigError
    from ad2_ds.run_checks import check_member_labels
    from ad2_ds.run_config import RunConfig

    config = RunConfig(teacher=("a", "b"), teacher_rule="confidence")
    with pytest.raises(ConfigError, match="stsb is a regression"):
        check_member_labels(config, SimpleNamespace(num_labels=1, name="stsb"))


def test_one_teacher_given_twice_as_a_list_is_that_teacher():
    from ad2_ds.run_config import RunConfig

    assert RunConfig(teacher=["a"]).teacher == "a"
    config = RunConfig(teacher=["a", "b"], teacher_tp_size=(1, 2), teacher_dtype="bf16", teacher_cache=["x", "y"])
    members = config.member_configs()
    assert [m.teacher for m in members] == ["a", "b"]
    assert [m.teacher_tp_size for m in members] == [1, 2]
    assert [m.teacher_dtype for m in members] == ["bf16", "bf16"]
    assert [m.teacher_cache for m in members] == ["x", "y"]
    # a member's cache key is that of a run with it alone: the other members and the weights are not in it
    alone = RunConfig(teacher="a", teacher_dtype="bf16", teacher_cache="x")
    assert members[0].teacher_settings() == alone.teacher_settings()
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    from ad2_ds.run_config import _per_member

    live_and_cached = RunConfig(teacher=("a", "b"), teacher_cache=_per_member(str)(",y"))  # an empty entry: live
    assert [m.teacher_cache for m in live_and_cached.member_configs()] == [None, "y"]


def test_the_mixed_probabilities_are_the_weighted_mean():
    from ad2_ds.teachers.ensemble import mix_logits, normalized_weights

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 3, generator=g) * 4 for _ in range(3)]
    w, t = normalized_weights((1, 1, 2), 3), 2.0
    assert w == (0.25, 0.25, 0.5)
    mixed = mix_logits(logits, w, t)
    want = sum(wm * torch.softmax(z / t, -1) for wm, z in zip(w, logits))
    assert torch.allclose(torch.softmax(mixed / t, -1), want, atol=1e-6)
    reg = [torch.randn(5, 1, generator=g) for _ in range(2)]  # regression: the weighted mean of the predictions
    assert torch.allclose(mix_logits(reg, (0.3, 0.7)), 0.3 * reg[0] + 0.7 * reg[1])
    # ours: a member sure of an example weighs more there; the per-example weights still sum to 1
    sure, unsure = torch.tensor([[9.0, 0.0]]), torch.tensor([[0.0, 0.1]])
    conf = torch.softmax(mix_logits([sure, unsure], (0.5, 0.5), 1.0, "confidence"), -1)
    mean = torch.softmax(mix_logits([sure, unsure], (0.5, 0.5), 1.0), -1)
    assert conf[0, 0] > mean[0, 0] and torch.allclose(conf.sum(-1), torch.ones(1))


def test_a_member_of_weight_zero_is_not_run_and_one_member_is_handed_on_bit_for_bit():
    from ad2_ds.teachers.base import TeacherOutput
    from ad2_ds.teachers.ensemble import EnsembleTeacher

    calls = []

    class Fixed:
        def __init__(self, name, z):
            self.name, self.z = name, z

        def __call__(self, batch):
            calls.append(self.name)
            return TeacherOutput(logits=self.z)

    z = torch.randn(4, 2)
    ensemble = EnsembleTeacher([Fixed("a", z), Fixed("b", -z)], weights=(1, 0), temperature=2.0)
    assert ensemble({}).logits is z and calls == ["a"]
    assert set(ensemble.member_seconds()) == {"teacher0", "teacher1"}


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "best" / "model.safetensors"))


def test_weights_1_0_reproduce_the_single_teacher_run_bit_for_bit(world, tiny_vocab, no_dist_left, capsys):
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    t2 = _second_teacher(tmp / "teacher2", tiny_vocab)
    common = ["--method", "ad2", "--epsilon", "1e-3"]
    assert distill_glue.main(_argv(data, ds, tmp / "one", "--teacher", str(teacher), *common)) == 0
    two = ["--teacher", str(teacher), "--teacher", str(t2), "--teacher_weights", "1,0", *common]
    assert distill_glue.main(_argv(data, ds, tmp / "two", *two)) == 0
    one, both = (json.loads((tmp / run / "results.json").read_text()) for run in ("one", "two"))
    assert both["history"] == one["history"] and both["best"] == one["best"]
    a, b = _weights(tmp / "one"), _weights(tmp / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    members = both["teacher_members"]
    assert [m["weight"] for m in members] == [1.0, 0.0] and [m["teacher"] for m in members] == [str(teacher), str(t2)]
    assert members[0]["teacher_scores"] == one["teacher_scores"] == both["teacher_scores"]  # the ensemble is member 0
    assert members[0]["train_seconds"] > 0 and members[1]["train_seconds"] == 0  # weight 0: never run
    # equal weights: a target of its own, trained through KD, the ascent and the ADA term
    assert distill_glue.main(_argv(data, ds, tmp / "mix", *two[:4], *common)) == 0
    mix = json.loads((tmp / "mix" / "results.json").read_text())
    assert [m["weight"] for m in mix["teacher_members"]] == [0.5, 0.5]
    assert all(m["train_seconds"] > 0 for m in mix["teacher_members"])
    c = _weights(tmp / "mix")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another target, another student
    table = capsys.readouterr().out
    assert "ensemble" in table and "teacher 2 (weight 0.50): dev accuracy" in table and str(t2) in table


def test_each_member_is_put_in_the_datas_label_order(tmp_path, tiny_vocab, no_dist_left):
    """Member B is member A with its outputs reordered and named so: aligned by name, the run on B alone (weights 0,1)
    is the run on A alone, bit for bit."""
    from test_custom_run import _argv as custom_argv
    from test_custom_run import named_teacher, write_csv
    from transformers import AutoModelForSequenceClassification, BertTokenizer

    from recipes import distill_glue

    splits = (("train", 24, 0), ("dev", 9, 1), ("test", 9, 2))
    files = {s: write_csv(tmp_path / "d" / f"{s}.csv", n, seed) for s, n, seed in splits}
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**json.loads((Path(__file__).parents[1] / "ds_configs" / "zero2.json").read_text()),
                              "train_micro_batch_size_per_gpu": 4}))  # fmt: skip
    a = named_teacher(tmp_path / "a", tiny_vocab, ("neg", "neu", "pos"))
    model = AutoModelForSequenceClassification.from_pretrained(a)
    order = [2, 0, 1]  # B's output i is A's output order[i]: pos, neg, neu
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[order].clone())
        model.classifier.bias.copy_(model.classifier.bias[order].clone())
    model.config.id2label = {i: ("neg", "neu", "pos")[j] for i, j in enumerate(order)}
    model.config.label2id = {n: i for i, n in model.config.id2label.items()}
    b = tmp_path / "b"
    model.save_pretrained(b)
    BertTokenizer(vocab=str(tiny_vocab)).save_pretrained(b)
    test = ["--test_file", str(files["test"])]
    assert distill_glue.main(custom_argv(files, ds, tmp_path / "alone", "--teacher", str(a), *test)) == 0
    extra = ["--teacher", str(a), "--teacher", str(b), "--teacher_weights", "0,1", *test]
    assert distill_glue.main(custom_argv(files, ds, tmp_path / "via_b", *extra)) == 0
    alone, via_b = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("alone", "via_b"))
    assert via_b["history"] == alone["history"]
    for key in ("teacher_scores", "teacher_test"):  # member B's, and the ensemble's (B alone), are A's
        assert via_b["teacher_members"][1][key] == via_b[key] == alone[key], key
    assert via_b["test"] == alone["test"] and set(via_b["teacher_members"][0]["teacher_test"]) == set(alone["test"])
    wa, wb = _weights(tmp_path / "alone"), _weights(tmp_path / "via_b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_each_member_keeps_its_own_cache_and_a_new_member_leaves_the_others_cache_alone(world, tiny_vocab,
                                                                                        no_dist_left):  # fmt: skip
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    t2 = _second_teacher(tmp / "teacher2", tiny_vocab)
    c1, c2 = tmp / "cache1", tmp / "cache2"
    assert distill_glue.main(_argv(data, ds, tmp / "one", "--teacher", str(teacher), "--teacher_cache", str(c1))) == 0
    stamp1 = (c1 / "meta.json").stat().st_mtime_ns
    both = ["--teacher", str(teacher), "--teacher", str(t2), "--teacher_cache", f"{c1},{c2}", "--method", "kd"]
    assert distill_glue.main(_argv(data, ds, tmp / "a", *both)) == 0
    assert (c1 / "meta.json").stat().st_mtime_ns == stamp1  # the first member's cache is reused as it was
    stamp2 = (c2 / "meta.json").stat().st_mtime_ns
    assert distill_glue.main(_argv(data, ds, tmp / "b", *both)) == 0
    assert [(c / "meta.json").stat().st_mtime_ns for c in (c1, c2)] == [stamp1, stamp2]  # all cached: none rebuilt
    a, b = (json.loads((tmp / r / "results.json").read_text()) for r in "ab")
    assert a["history"] == b["history"]
    wa, wb = _weights(tmp / "a"), _weights(tmp / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    live_first = [*both[:4], "--teacher_cache", f",{c2}", "--method", "kd"]  # member 1 live, member 2 cached
    assert distill_glue.main(_argv(data, ds, tmp / "c", *live_first)) == 0
    assert [(c / "meta.json").stat().st_mtime_ns for c in (c1, c2)] == [stamp1, stamp2]
    assert len(json.loads((tmp / "c" / "results.json").read_text())["teacher_members"]) == 2


def test_deep_kd_takes_the_hidden_states_of_the_named_member(world, tiny_vocab, no_dist_left):
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    t2 = _second_teacher(tmp / "teacher2", tiny_vocab)
    argv = ["--teacher", str(teacher), "--teacher", str(t2), "--method", "ad2-paper", "--hidden_source_teacher", "1"]
    assert distill_glue.main(_argv(data, ds, tmp / "dkd", *argv)) == 0
    results = json.loads((tmp / "dkd" / "results.json").read_text())
    assert results["run_config"]["hidden_source_teacher"] == "1" and len(results["teacher_members"]) == 2


def test_a_tensor_parallel_member_beside_a_whole_one_on_two_ranks(world, tiny_vocab, no_dist_left):
    """teacher_tp_size 2,1: member 1 is loaded shard by shard and run over both ranks, member 2 whole on each;
    each member's dev scores are those it gets on one rank."""
    import os
    import subprocess
    import sys

    from ad2_ds.dist import find_free_port
    from recipes import distill_glue

    tmp, data, teacher, ds = world
    t2 = _second_teacher(tmp / "teacher2", tiny_vocab)
    both = ["--teacher", str(teacher), "--teacher", str(t2), "--method", "ad2", "--epsilon", "1e-3"]
    assert distill_glue.main(_argv(data, ds, tmp / "one_rank", *both)) == 0
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(root))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(find_free_port()), str(root / "recipes" / "distill_glue.py"),
           *_argv(data, ds, tmp / "two_ranks", *both, "--teacher_tp_size", "2,1")]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = (json.loads((tmp / r / "results.json").read_text()) for r in ("one_rank", "two_ranks"))
    assert two["world_size"] == 2 and two["teacher_load"] == "shards"
    for m in range(2):
        got, want = two["teacher_members"][m]["teacher_scores"], one["teacher_members"][m]["teacher_scores"]
        assert got == pytest.approx(want, abs=1e-6), m
    assert two["teacher_scores"] == pytest.approx(one["teacher_scores"], abs=1e-6)  # the ensemble's


def test_two_default_teachers_of_different_seeds_are_two_members(monkeypatch, tmp_path):
    """--teacher all-MiniLM-L6-v2 twice with --teacher_seed 42,43: each member is fine-tuned here in its own cache
    folder, and run_distillation hands distill one path per member."""
    from ad2_ds import default_teacher, run
    from ad2_ds.data.tasks import get_task
    from recipes import distill_glue

    monkeypatch.setenv("AD2_CACHE", str(tmp_path))
    base = ["--deepspeed", str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json")]
    config = distill_glue.parse_args(
        base + ["--teacher", "all-MiniLM-L6-v2", "--teacher", "all-MiniLM-L6-v2", "--teacher_seed", "42,43"]
    )
    members = config.member_configs()
    dirs = [default_teacher.default_teacher_dir(m, get_task("movie-polarity")) for m in members]
    assert dirs[0].endswith("-s42") and dirs[1].endswith("-s43")
    tuned, handed = [], {}
    monkeypatch.setattr(run, "prepare", lambda c: type("P", (), {"task": get_task("movie-polarity"), "ds_config": {}}))
    monkeypatch.setattr(default_teacher, "ensure_default_teacher", lambda m, t, d: tuned.append(m.teacher_seed) or
                        f"teacher-s{m.teacher_seed}")  # fmt: skip
    monkeypatch.setattr(run, "distill", lambda c, p, path, cb: handed.setdefault("path", path))
    run.run_distillation(config)
    assert tuned == [42, 43] and handed["path"] == ("teacher-s42", "teacher-s43")


def _recipe_rank(rank, world_size, argv):
    from recipes import distill_glue

    return distill_glue.main(argv)


def test_members_hosted_on_ranks_of_their_own_train_as_co_located_members(world, tiny_vocab):
    """--teacher_ranks 0/1: each member served by a rank of its own, the student on rank 2, is the co-located
    ensemble on one rank bit for bit (history, the ensemble's and each member's dev scores, the student); the teacher
    ranks load their member whole and the student rank never loads either."""
    from ad2_ds.testing import launch

    from conftest import recipe_rank_loads

    tmp, data, teacher, ds = world
    t2 = _second_teacher(tmp / "teacher2", tiny_vocab)
    both = ["--teacher", str(teacher), "--teacher", str(t2), "--method", "ad2", "--epsilon", "1e-3"]
    assert launch(_recipe_rank, 1, args=(_argv(data, ds, tmp / "colocated", *both),), timeout_s=300) == [0]
    argv = _argv(data, ds, tmp / "hosted", *both, "--teacher_ranks", "0/1")
    ranks = launch(recipe_rank_loads, 3, args=(argv,), timeout_s=300)
    assert [rc for rc, _ in ranks] == [0, 0, 0]
    assert str(teacher) in ranks[0][1] and str(t2) not in ranks[0][1]  # each teacher rank its own member
    assert str(t2) in ranks[1][1] and str(teacher) not in ranks[1][1]
    assert str(teacher) not in ranks[2][1] and str(t2) not in ranks[2][1]  # the student cuts its layers from tensors
    c, h = (json.loads((tmp / r / "results.json").read_text()) for r in ("colocated", "hosted"))
    assert h["world_size"] == 1 and h["teacher_ranks"] == [[0], [1]] and c["teacher_ranks"] == []
    assert h["history"] == c["history"] and h["teacher_scores"] == c["teacher_scores"]
    for m in range(2):
        assert h["teacher_members"][m]["teacher_scores"] == c["teacher_members"][m]["teacher_scores"], m
        assert h["teacher_members"][m]["train_seconds"] > 0
    a, b = _weights(tmp / "colocated"), _weights(tmp / "hosted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_hosted_members_own_bad_setting_names_that_member():
    """--teacher_ranks 0/1 with --teacher_tp_size 1,2: the second member (on rank 1 alone) cannot be tensor-parallel
    over 2 ranks; the error names that member, not the first."""
    from ad2_ds.config import ConfigError
    from ad2_ds.run_config import RunConfig

    with pytest.raises(ConfigError, match=r"tensor-parallel over those ranks \(teacher 2, b, on ranks \(1,\)\)"):
        RunConfig(teacher=("a", "b"), teacher_ranks="0/1", teacher_tp_size=(1, 2))
