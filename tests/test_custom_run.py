"""The user's own data through the run layer: ``recipes/distill_glue.py --train_file ... --validation_file ...`` on
tiny CSVs (a test file scored once, the data's label names in the student's config.json), the cheap checks before
anything is written, the teacher's labels checked and remapped by name, and a default teacher keyed by the data."""

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from ad2_ds.data.custom import DataError
from ad2_ds.run import DataConfig

from conftest import save_tiny_teacher, tiny_bert_config

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("neg", "neu", "pos")  # sorted: the data's label order
WORDS = {"neg": ["bad", "awful", "boring", "hate"], "neu": ["plot", "film", "it", "this"], "pos": ["good", "great"]}


def write_csv(path, n, seed=0, columns=("text", "label")):
    import random

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for i in range(n):
            label = ("pos", "neg", "neu")[i % 3]  # file order differs from the sorted label order
            words = [rng.choice(WORDS[label]), *rng.sample(["the", "movie", "was", "very", "really"], 2)]
            rng.shuffle(words)
            w.writerow([" ".join(words), label])
    return path


@pytest.fixture
def own_data(tmp_path, tiny_vocab):
    d = tmp_path / "tickets"
    files = {
        s: write_csv(d / f"{s}.csv", n, seed) for s, n, seed in (("train", 36, 0), ("dev", 12, 1), ("test", 9, 2))
    }
    ds = tmp_path / "ds.json"
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 4
    ds.write_text(json.dumps(cfg))
    return files, ds


def named_teacher(path, vocab, names):
    """A tiny 3-class teacher whose config names its outputs ``names`` (in that order)."""
    save_tiny_teacher(path, vocab, num_labels=len(names))
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _argv(files, ds, out, *extra):
    return ["--deepspeed", str(ds), "--train_file", str(files["train"]), "--validation_file", str(files["dev"]),
            "--text_column", "text", "--label_column", "label", "--student_layers", "bottom:1",
            "--max_seq_length", "16", "--num_train_epochs", "1", "--method", "kd", "--output_dir", str(out),
            "--no_progress", *extra]  # fmt: skip


def test_flags_take_the_users_data(own_data):
    from recipes import distill_glue

    files, ds = own_data
    c = distill_glue.parse_args(_argv(files, ds, "out", "--text_column", "q,doc", "--task_type", "classification"))
    assert c.data.is_custom and c.data.text_column == ("q", "doc") and c.data.train_file == str(files["train"])
    assert c.data.custom().text_columns == ("q", "doc") and c.data.task_type == "classification"
    with pytest.raises(ValueError, match="train_file"):
        DataConfig(label_column="label")  # an own-data option without own data
    with pytest.raises(DataError, match="--validation_file"):
        DataConfig(train_file=str(files["train"]))
    with pytest.raises(ValueError, match="data_dir is for GLUE-format tasks"):
        DataConfig(train_file=str(files["train"]), validation_file=str(files["dev"]), data_dir="glue")
    with pytest.raises(DataError, match="unknown format"):
        DataConfig(train_file="a.xlsx", validation_file="b.csv")
    from ad2_ds.flags import teacher_neutral_flags
    from ad2_ds.run import RunConfig

    neutral = teacher_neutral_flags(RunConfig)
    assert "--test_file" in neutral and "--train_file" not in neutral and "--label_column" not in neutral


def test_own_csvs_distil_end_to_end_with_a_test_score_and_named_labels(
    own_data, tmp_path, tiny_vocab, no_dist_left, capsys, caplog
):
    from recipes import distill_glue

    files, ds = own_data
    teacher = named_teacher(tmp_path / "teacher", tiny_vocab, ("pos", "neg", "neu"))  # the data's names, reordered
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        code = distill_glue.main(_argv(files, ds, out, "--test_file", str(files["test"]), "--teacher", str(teacher)))
    assert code == 0
    assert any("remapped" in r.getMessage() for r in caplog.records)
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "tickets" and results["labels"] == list(LABELS) and results["main_metric"] == "accuracy"
    assert set(results["test"]) == {"accuracy", "macro_f1"} and 0.0 <= results["test"]["macro_f1"] <= 1.0
    assert set(results["teacher_test"]) == {"accuracy", "macro_f1"}
    assert results["train_examples"] == 36 and results["run_config"]["data"]["test_file"] == str(files["test"])
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and config["label2id"]["pos"] == 2
    table = capsys.readouterr().out
    assert "test accuracy" in table and "tickets, method kd" in table


def test_a_tensor_parallel_teacher_with_reordered_names_scores_as_the_whole_one(own_data, tmp_path, tiny_vocab):
    """teacher_tp_size 2 on two ranks: the teacher is loaded shard by shard, its head is never whole, so its logits
    are put in the data's label order as they come out; its dev and test scores equal the whole teacher's."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForSequenceClassification

    from ad2_ds.dist import find_free_port

    files, ds = own_data
    teacher = named_teacher(tmp_path / "teacher", tiny_vocab, ("pos", "neg", "neu"))
    model = AutoModelForSequenceClassification.from_pretrained(teacher)
    with torch.no_grad():  # the teacher says "pos" (its output 0, the data's label 2) whatever the text
        model.classifier.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))
    model.save_pretrained(teacher)
    for split in ("dev", "test"):  # more pos than neg: a label order mix-up changes the scores
        rows = [r for r in csv.reader(open(files[split]))][1:]
        rows = [r for r in rows if r[1] != "neg"] + [r for r in rows if r[1] == "neg"][:1]
        with open(files[split], "w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    results = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        argv = _argv(files, ds, out, "--test_file", str(files["test"]), "--teacher", str(teacher))
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                    str(find_free_port())]  # fmt: skip
        cmd = launcher + [str(ROOT / "recipes" / "distill_glue.py"), *argv, "--teacher_tp_size", str(tp)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stderr[-3000:]
        results[tp] = json.loads((out / "results.json").read_text())
    assert (results[1]["teacher_load"], results[2]["teacher_load"]) == ("whole", "shards")
    for key in ("teacher_scores", "teacher_test"):
        assert results[2][key] == pytest.approx(results[1][key], abs=1e-6), key
    dev_labels = [r[1] for r in list(csv.reader(open(files["dev"])))[1:]]
    assert results[2]["teacher_scores"]["accuracy"] == pytest.approx(dev_labels.count("pos") / len(dev_labels))
    config = json.loads((tmp_path / "tp2" / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}


def test_teacher_head_is_reordered_by_name_and_unnamed_labels_map_by_position(own_data, tmp_path, tiny_vocab, caplog):
    from transformers import AutoModelForSequenceClassification

    from ad2_ds.data.custom import load_custom_task
    from ad2_ds.run import load_classifier

    files, _ = own_data
    spec, _ = load_custom_task(DataConfig(train_file=str(files["train"]), validation_file=str(files["dev"])).custom())
    assert spec.label_list == LABELS
    x = torch.tensor([[2, 10, 11, 3]])
    named = named_teacher(tmp_path / "named", tiny_vocab, ("pos", "neg", "neu"))
    raw = AutoModelForSequenceClassification.from_pretrained(named).eval()
    aligned = load_classifier(str(named), 3, False, False, "teacher", spec).eval()
    with torch.no_grad():
        want, got = raw(input_ids=x).logits, aligned(input_ids=x).logits
    assert torch.allclose(got, want[:, [1, 2, 0]])  # neg, neu, pos taken from the teacher's outputs 1, 2, 0
    assert aligned.config.id2label == {0: "neg", 1: "neu", 2: "pos"}

    unnamed = save_tiny_teacher(tmp_path / "unnamed", tiny_vocab, num_labels=3)
    with caplog.at_level(logging.WARNING):
        model = load_classifier(str(unnamed), 3, False, False, "teacher", spec).eval()
    assert any("mapped by position" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        assert torch.allclose(
            model(input_ids=x).logits,
            AutoModelForSequenceClassification.from_pretrained(unnamed).eval()(input_ids=x).logits,
        )


def _snapshot(root):
    return {p: p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "case",
    ["misspelt column", "missing file", "label unseen in training", "teacher for other labels", "not utf-8"],
)
def test_bad_own_data_is_one_line_and_exit_2_with_nothing_written(
    case, own_data, tmp_path, tiny_vocab, capsys, no_dist_left
):
    from recipes import distill_glue

    files, ds = own_data
    teacher = named_teacher(tmp_path / "teacher", tiny_vocab, ("neg", "neu", "pos"))
    out = tmp_path / "out"
    extra, expected = ["--teacher", str(teacher)], None
    if case == "misspelt column":
        extra += ["--label_column", "lable"]
        expected = "no column 'lable' (--label_column); its columns are ['text', 'label']"
    elif case == "missing file":
        extra += ["--test_file", str(tmp_path / "nope.csv")]
        expected = "no such file"
    elif case == "label unseen in training":
        dev = files["dev"]
        dev.write_text(dev.read_text().replace(",neu\n", ",mixed\n", 1))
        expected = "labels ['mixed'] never appear in the training data"
    elif case == "teacher for other labels":
        extra = ["--teacher", str(named_teacher(tmp_path / "other", tiny_vocab, ("a", "b", "c")))]
        expected = "are not the data's labels"
    else:
        files["train"].write_bytes(files["train"].read_bytes() + b"caf\xe9 movie,pos\n")
        expected = "is not valid UTF-8"
    before, _ = _snapshot(tmp_path), capsys.readouterr()
    assert distill_glue.main(_argv(files, ds, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists() and _snapshot(tmp_path) == before


def test_default_teacher_is_fine_tuned_on_the_data_and_keyed_by_its_content(
    own_data, tmp_path, tiny_vocab, monkeypatch, capsys, no_dist_left
):
    from transformers import BertModel, BertTokenizer

    from ad2_ds import default_teacher
    from ad2_ds.data.custom import load_custom_task
    from recipes import distill_glue

    files, ds = own_data
    base = tmp_path / "base"  # stands in for all-MiniLM-L6-v2: a body without a classification head
    BertModel(tiny_bert_config()).save_pretrained(base)
    BertTokenizer(vocab=str(tiny_vocab)).save_pretrained(base)
    monkeypatch.setenv("AD2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_teacher, "DEFAULT_MODEL", str(base))
    argv = _argv(files, ds, tmp_path / "run", "--teacher_epochs", "1")
    assert distill_glue.main(argv) == 0
    assert "teacher: fine-tuning" in capsys.readouterr().out
    (teacher,) = [p.parent for p in (tmp_path / "cache" / "teachers").rglob("config.json")]
    assert json.loads((teacher / "config.json").read_text())["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}

    config = distill_glue.parse_args(argv)
    spec, _ = load_custom_task(config.data.custom())
    same = default_teacher.default_teacher_dir(config, spec)
    assert same == str(teacher)
    other = write_csv(tmp_path / "tickets2" / "train.csv", 36, seed=5)  # same folder name, other content
    config2 = distill_glue.parse_args(argv[:3] + [str(other)] + argv[4:])
    assert config2.data.train_file == str(other)
    other_dir = default_teacher.default_teacher_dir(config2, spec)
    assert other_dir != same and other_dir.split("-data")[0] == same.split("-data")[0]
