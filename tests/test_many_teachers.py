"""Several teachers (``--teacher A --teacher B``): the settings checked before any model loads, the ensemble's
target, and runs through the run layer on tiny models."""

import json
import time

import pytest

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
    "hosted layout": (["--teacher_ranks", "0"], "not supported with several teachers"),
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
