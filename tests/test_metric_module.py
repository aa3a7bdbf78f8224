"""``--metric`` taking an ``evaluate`` module for one's own data: a tiny metric script written here picks the best
student end to end; one that cannot be loaded, or whose compute fails, is one line before any model is loaded."""

import json
from pathlib import Path

import pytest

from conftest import save_tiny_teacher, write_ds_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = '''
import datasets
import evaluate


class NegError(evaluate.Metric):
    """Minus the error rate: higher is better."""

    def _info(self):
        return evaluate.MetricInfo(
            description="minus the error rate", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        {body}
'''
OK_BODY = 'return {"neg_error": -sum(p != r for p, r in zip(predictions, references)) / len(references)}'
WORDS = {"neg": ["bad", "awful", "boring", "hate"], "pos": ["good", "great", "fun", "movie"]}


def _metric(root: Path, body=OK_BODY) -> Path:
    folder = root / "neg_error"  # evaluate.load(folder) reads folder/neg_error.py
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "neg_error.py").write_text(SCRIPT.replace("{body}", body))
    return folder


def _data(root: Path):
    rows = [(f"{WORDS[lab][i % 4]} the film", lab) for i in range(16) for lab in ("pos", "neg")]
    out = {}
    for split, part in (("train", rows[:24]), ("dev", rows[24:])):
        path = root / "own" / f"{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in part))
        out[split] = path
    return out


@pytest.fixture
def setup(tmp_path, tiny_vocab):
    teacher = save_tiny_teacher(tmp_path / "teacher", tiny_vocab)
    ds = write_ds_config(tmp_path / "ds.json", train_micro_batch_size_per_gpu=4)
    return tmp_path, teacher, ds, _data(tmp_path)


def _argv(files, teacher, ds, out, metric):
    return ["--deepspeed", str(ds), "--train_file", str(files["train"]), "--validation_file", str(files["dev"]),
            "--teacher", str(teacher), "--student_layers", "bottom:1", "--max_seq_length", "16", "--method", "kd",
            "--num_train_epochs", "2", "--output_dir", str(out), "--no_progress", "--metric", str(metric)]  # fmt: skip


def test_a_local_evaluate_module_picks_the_best_student(setup, no_dist_left, capsys):
    from recipes import distill_glue

    tmp, teacher, ds, files = setup
    out = tmp / "run"
    assert distill_glue.main(_argv(files, teacher, ds, out, _metric(tmp / "metrics"))) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["main_metric"] == "neg_error"
    history = results["history"]
    assert len(history) == 2 and all(-1 <= h["neg_error"] <= 0 for h in history)
    for h in history:  # the module's score is minus the error rate the built-in accuracy measures
        assert h["neg_error"] == pytest.approx(h["accuracy"] - 1)
    assert results["best"]["neg_error"] == max(h["neg_error"] for h in history)
    assert results["teacher_scores"]["neg_error"] == pytest.approx(results["teacher_scores"]["accuracy"] - 1)
    assert "dev neg_error" in capsys.readouterr().out  # the summary table reports it


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp / "nowhere" / "my_metric", "evaluate cannot load it"),
        (lambda tmp: _metric(tmp / "broken", "raise RuntimeError('no scores today')"), "its compute failed"),
        (lambda tmp: _metric(tmp / "two", 'return {"a": 1.0, "b": 2.0}'), "it must return one number"),
    ],
)
def test_a_metric_module_that_cannot_be_used_is_one_line(setup, make, expected, no_dist_left, capsys):
    from recipes import distill_glue

    tmp, teacher, ds, files = setup
    out = tmp / "run"
    assert distill_glue.main(_argv(files, teacher, ds, out, make(tmp))) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and expected in err[0] and "--metric" in err[0], err
    assert not out.exists()
