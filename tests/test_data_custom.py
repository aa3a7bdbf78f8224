"""A user's own data (ad2_ds.data.custom): formats, columns, labels, metrics, test split, bad input, label checks."""

import json
import logging

import numpy as np
import pytest
import torch

from ad2_ds.data.custom import (
    CustomData,
    DataError,
    align_teacher_labels,
    load_custom_task,
    match_teacher_labels,
    set_label_names,
)
from ad2_ds.data.glue import DataCollator, tokenize_dataset
from ad2_ds.metrics import compute_metrics

TRAIN = [("good fun movie", "pos"), ("awful boring film", "neg"), ("what a plot", "neutral"), ("great acting", "pos"),
         ("bad acting", "neg"), ("it was a film", "neutral")]  # fmt: skip
DEV = [("very good", "pos"), ("very bad", "neg"), ("a movie", "neutral")]


def write(path, rows, columns=("text", "label")):
    """rows of tuples -> a file in the format its suffix names."""
    import pandas as pd

    df = pd.DataFrame([dict(zip(columns, r)) for r in rows], columns=list(columns))
    suffix = path.suffix
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    elif suffix == ".json":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))  # JSON lines, as datasets reads
    elif suffix == ".parquet":
        df.to_parquet(path)
    return str(path)


def files(tmp_path, suffix=".csv", train=TRAIN, dev=DEV, test=None, columns=("text", "label")):
    d = tmp_path / "tickets"
    d.mkdir(exist_ok=True)
    out = dict(
        train_file=write(d / f"train{suffix}", train, columns), validation_file=write(d / f"dev{suffix}", dev, columns)
    )
    if test is not None:
        out["test_file"] = write(d / f"test{suffix}", test, columns)
    return out


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_each_format_gives_the_load_task_form(tmp_path, suffix):
    spec, raw = load_custom_task(CustomData(**files(tmp_path, suffix)))
    assert spec.name == "tickets" and spec.label_list == ("neg", "neutral", "pos")  # sorted, stable
    assert spec.metric_names == ("accuracy", "macro_f1") and spec.main_metric == "accuracy"
    assert list(raw) == ["train", "dev"] and spec.splits == ("train", "dev") and spec.test_split is None
    assert raw["train"].column_names == ["text_a", "label", "idx"]
    assert raw["train"].features["label"].names == ["neg", "neutral", "pos"]
    assert raw["train"]["text_a"] == [t for t, _ in TRAIN]
    assert raw["train"]["label"] == [2, 0, 1, 2, 0, 1] and raw["train"]["idx"] == list(range(6))
    assert raw["dev"]["label"] == [2, 0, 1]


def test_int_labels_sort_numerically_and_two_classes_get_f1(tmp_path):
    train = [("a", 10), ("b", 2), ("c", 10), ("d", 2)]
    spec, raw = load_custom_task(CustomData(**files(tmp_path, ".jsonl", train=train, dev=[("e", 2), ("f", 10)])))
    assert spec.label_list == ("2", "10")  # numeric order, not "10" < "2"
    assert spec.metric_names == ("accuracy", "f1") and raw["train"]["label"] == [1, 0, 1, 0]
    spec2, _ = load_custom_task(CustomData(**files(tmp_path, ".jsonl", train=train, dev=[("e", 2)]), main_metric="f1"))
    assert spec2.main_metric == "f1"


def test_float_labels_are_regression_unless_told(tmp_path):
    train = [("a", 0.5), ("b", 1.5), ("c", 3.0)]
    spec, raw = load_custom_task(CustomData(**files(tmp_path, ".csv", train=train, dev=[("d", 2.25)])))
    assert spec.is_regression and spec.num_labels == 1 and spec.metric_names == ("pearson", "spearmanr")
    assert raw["train"].features["label"].dtype == "float32" and raw["dev"]["label"] == [2.25]
    # integer scores as a regression target
    ints = files(tmp_path, ".csv", train=[("a", 1), ("b", 5)], dev=[("c", 3)])
    spec, raw = load_custom_task(CustomData(**ints, task_type="regression"))
    assert spec.is_regression and raw["train"]["label"] == [1.0, 5.0]
    # whole-number floats as classes
    whole = files(tmp_path, ".csv", train=[("a", 1.0), ("b", 0.0)], dev=[("c", 1.0)])
    spec, raw = load_custom_task(CustomData(**whole, task_type="classification"))
    assert spec.label_list == ("0", "1") and raw["dev"]["label"] == [1]


def test_sentence_pairs_guessed_and_given(tmp_path):
    cols = ("premise", "hypothesis", "label")
    train = [("a b", "b", "entailment"), ("a", "not a", "contradiction")]
    spec, raw = load_custom_task(CustomData(**files(tmp_path, ".csv", train=train, dev=train, columns=cols)))
    assert spec.is_pair and spec.text_columns == ("premise", "hypothesis")
    assert raw["train"].column_names == ["text_a", "text_b", "label", "idx"] and raw["train"]["text_b"] == [
        "b",
        "not a",
    ]
    cols = ("q", "doc", "y")
    given = CustomData(
        **files(tmp_path, ".csv", train=train, dev=train, columns=cols), text_columns=("doc", "q"), label_column="y"
    )
    spec, raw = load_custom_task(given)
    assert raw["train"]["text_a"] == ["b", "not a"] and spec.label_list == ("contradiction", "entailment")


def test_test_split_is_kept_and_named(tmp_path):
    spec, raw = load_custom_task(CustomData(**files(tmp_path, ".parquet", test=[("fun", "pos"), ("hate", "neg")])))
    assert spec.test_split == "test" and spec.splits == ("train", "dev", "test") and spec.dev_splits == ("dev",)
    assert raw["test"]["label"] == [2, 0] and raw["test"].features == raw["train"].features


def test_tokenize_collate_and_metrics_work_unchanged(tmp_path, tiny_tokenizer):
    long_text = "good " * 50_000  # one 250k-character line: truncated and counted, not an error
    train = TRAIN + [(long_text, "pos")]
    spec, raw = load_custom_task(CustomData(**files(tmp_path, ".csv", train=train)))
    enc, truncated = tokenize_dataset(raw, tiny_tokenizer, max_length=16)
    assert truncated["train"] == {"s": 1} and truncated["dev"] == {"s": 0}
    batch = DataCollator(tiny_tokenizer.pad_token_id)([enc["train"][i] for i in range(7)])
    assert batch["input_ids"].shape == (7, 16) and batch["labels"].tolist() == [2, 0, 1, 2, 0, 1, 2]
    logits = np.eye(3)[[2, 0, 0]]  # dev truth [2, 0, 1]: the third is wrong
    scores = compute_metrics(spec, logits, raw["dev"]["label"])
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)  # neg: p=.5 r=1; neutral: 0; pos: 1


def bad(tmp_path, **kw):
    with pytest.raises(DataError) as e:
        load_custom_task(CustomData(**kw))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_inputs_one_line_each(tmp_path):
    ok = files(tmp_path, ".csv")
    assert "no such file" in bad(tmp_path, **{**ok, "validation_file": str(tmp_path / "nope.csv")})
    assert "unknown format '.xlsx'" in bad(tmp_path, **{**ok, "train_file": str(tmp_path / "t.xlsx")})
    assert "needs --train_file and --validation_file" in bad(tmp_path, train_file=ok["train_file"])
    msg = bad(tmp_path, **ok, label_column="lable")
    assert "no column 'lable'" in msg and "['text', 'label']" in msg
    assert "no column 'txt'" in bad(tmp_path, **ok, text_columns=("txt",))
    assert "no text column found" in bad(tmp_path, **files(tmp_path, ".csv", columns=("body", "label")))
    assert "no label column found" in bad(tmp_path, **files(tmp_path, ".csv", columns=("text", "y")))
    empty = files(tmp_path, ".csv", dev=[])
    assert "has no examples: the dev split is empty" in bad(tmp_path, **empty)
    msg = bad(tmp_path, **files(tmp_path, ".csv", test=[("x", "angry")]))
    assert "test.csv: labels ['angry'] never appear in the training data" in msg
    msg = bad(tmp_path, **files(tmp_path, ".csv", train=TRAIN + [("x", 3)]))
    assert "mixed label types" in msg
    assert "mixed label types" in bad(tmp_path, **files(tmp_path, ".jsonl", train=[("x", 1), ("y", "pos")]))
    assert "example 2 has no 'label'" in bad(tmp_path, **files(tmp_path, ".csv", train=[("x", "a"), ("y", None)]))
    assert "is not a whole number" in bad(tmp_path, **files(tmp_path, ".csv", train=[("x", 1.5), ("y", 2.0)]),
                                          task_type="classification")  # fmt: skip
    assert "only one label" in bad(tmp_path, **files(tmp_path, ".csv", train=[("x", "a")], dev=[("y", "a")]))
    ok = files(tmp_path, ".csv")  # the calls above rewrote the files
    assert "--main_metric 'f1'" in bad(tmp_path, **ok, main_metric="f1")  # 3 classes: macro_f1
    with pytest.raises(DataError, match="--task_type"):
        CustomData(**ok, task_type="multilabel")
    with pytest.raises(DataError, match="not both"):
        CustomData(**ok, dataset_name="imdb")


def test_non_utf8_file_names_the_line(tmp_path):
    ok = files(tmp_path, ".csv")
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nfine,pos\ncaf\xe9 au lait,neg\n".encode("latin-1"))
    msg = bad(tmp_path, **{**ok, "train_file": str(path)})
    assert "latin1.csv line 3 is not valid UTF-8" in msg


def test_unreachable_hub_is_one_clear_line(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    msg = bad(tmp_path, dataset_name="someone/tickets-that-do-not-exist")
    assert msg.startswith("could not load someone/tickets-that-do-not-exist from the Hugging Face hub")
    assert "--train_file" in msg


def _spec(tmp_path):
    return load_custom_task(CustomData(**files(tmp_path, ".csv")))[0]  # labels neg, neutral, pos


def _teacher(id2label=None):
    from conftest import tiny_bert

    model = tiny_bert(num_labels=3)
    if id2label is not None:
        model.config.id2label = dict(enumerate(id2label))
        model.config.label2id = {n: i for i, n in enumerate(id2label)}
    return model


def test_teacher_with_same_names_in_another_order_is_remapped(tmp_path, caplog):
    spec = _spec(tmp_path)
    model = _teacher(["pos", "neg", "neutral"])
    assert match_teacher_labels(_teacher(["neg", "neutral", "pos"]).config, spec) is None
    assert match_teacher_labels(model.config, spec) == (1, 2, 0)
    ids = torch.tensor([[2, 8, 9, 3]])
    before = model(input_ids=ids).logits
    with caplog.at_level(logging.INFO, logger="ad2_ds.data.custom"):
        align_teacher_labels(model, spec)
    assert "remapped" in caplog.text
    after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before[:, [1, 2, 0]])
    assert model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}


def test_unnamed_teacher_maps_by_position_with_a_warning(tmp_path, caplog):
    spec = _spec(tmp_path)
    model = _teacher()
    with caplog.at_level(logging.WARNING, logger="ad2_ds.data.custom"):
        assert match_teacher_labels(model.config, spec) is None
    assert "mapped by position" in caplog.text


def test_teacher_with_other_labels_is_an_error(tmp_path):
    spec = _spec(tmp_path)
    with pytest.raises(DataError, match=r"teacher's labels \['a', 'b', 'c'\] are not the data's"):
        match_teacher_labels(_teacher(["a", "b", "c"]).config, spec)
    from conftest import tiny_bert

    with pytest.raises(DataError, match="2 unnamed labels but tickets has 3"):
        match_teacher_labels(tiny_bert(num_labels=2).config, spec)


def test_student_config_carries_the_labels(tmp_path):
    from transformers import AutoConfig

    from conftest import tiny_bert

    spec = _spec(tmp_path)
    student = tiny_bert(num_labels=3)
    set_label_names(student.config, spec)
    student.save_pretrained(tmp_path / "s")
    config = AutoConfig.from_pretrained(tmp_path / "s")
    assert config.id2label == {0: "neg", 1: "neutral", 2: "pos"} and config.label2id["pos"] == 2


def test_custom_spec_is_neither_glue_nor_offline(tmp_path):
    from ad2_ds.data.tasks import GLUE_TASKS, OFFLINE_TASKS, get_task

    spec = _spec(tmp_path)
    assert spec.is_custom and not spec.is_offline
    assert not any(get_task(name).is_custom for name in GLUE_TASKS + OFFLINE_TASKS)
