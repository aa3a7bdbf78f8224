"""ad2_ds.hf.AD2Trainer: the AD2 objective inside transformers' Trainer, one rank in-process and two under the
``deepspeed`` launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ad2_ds import AD2Config
from ad2_ds.data.custom import CustomData, load_custom_task, set_label_names
from ad2_ds.data.glue import DataCollator, tokenize_dataset

from conftest import SPECIAL, WORDS, tiny_bert

REPO = Path(__file__).resolve().parent.parent
TEXTS = {
    "pos": ["good fun movie", "great acting", "love it", "a great film", "really good plot", "fun fun fun"],
    "neg": ["awful boring film", "bad acting", "hate it", "a bad movie", "really boring plot", "awful awful"],
    "neutral": ["what is the plot", "who was it", "the film", "a movie", "which film", "when is it"],
}


def write_csvs(root):
    """train.csv (18 rows, 3 classes), dev.csv and test.csv (the same texts: enough for checks of wiring)."""
    import csv

    root.mkdir(parents=True, exist_ok=True)
    rows = [(t, label) for label, texts in TEXTS.items() for t in texts]
    for name in ("train", "dev", "test"):
        with open(root / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)
    return root


def tiny_setup(tmp_path, tiny_tokenizer):
    data = write_csvs(tmp_path / "data")
    spec, raw = load_custom_task(CustomData(str(data / "train.csv"), str(data / "dev.csv"), str(data / "test.csv")))
    enc, _ = tokenize_dataset(raw, tiny_tokenizer, max_length=16)
    teacher = tiny_bert(num_labels=3, seed=1)
    student = tiny_bert(num_labels=3, seed=2, hidden=16, layers=1, heads=2)  # narrower: deep KD needs projections
    set_label_names(student.config, spec)
    return spec, enc, teacher, student


def training_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_ad2_trainer_one_rank(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from ad2_ds.hf import PROJECTIONS, AD2Trainer, metrics_function

    spec, enc, teacher, student = tiny_setup(tmp_path, tiny_tokenizer)
    trainer = AD2Trainer(
        model=student,
        args=training_args(tmp_path / "run"),
        train_dataset=enc["train"],
        eval_dataset=enc["dev"],
        data_collator=DataCollator(tiny_tokenizer.pad_token_id),
        compute_metrics=metrics_function(spec),
        teacher=teacher,
        ad2_config=AD2Config(method="ad2-paper", epsilon=1e-2, step_size=1e-2),
    )
    projections = getattr(student, PROJECTIONS)
    assert len(projections) > 0  # widths 16 vs 32
    before = {k: v.clone() for k, v in projections.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for key in ("ad2/ce", "ad2/kd", "ad2/ada", "ad2/hidden", "ad2/attention", "ad2/delta_norm_max"):
        assert key in logged[0] and logged[0][key] >= 0, key
    assert logged[0]["ad2/delta_norm_max"] > 0
    after = projections.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # projections trained
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())  # teacher frozen

    scores = trainer.evaluate()
    assert set(scores) >= {"eval_loss", "eval_accuracy", "eval_macro_f1"}
    test = trainer.evaluate(enc["test"], metric_key_prefix="test")
    assert test["test_accuracy"] == pytest.approx(scores["eval_accuracy"])  # same texts in dev and test

    trainer.save_model(str(tmp_path / "student"))
    assert (tmp_path / "student" / f"{PROJECTIONS}.safetensors").is_file()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student", attn_implementation="eager")
    assert loaded.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert not any(k.startswith(PROJECTIONS) for k in loaded.state_dict())
    student.eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_ad2_trainer_without_a_teacher_and_with_a_cache_like_teacher(tmp_path, tiny_tokenizer):
    from ad2_ds.hf import AD2Trainer
    from ad2_ds.teachers import LocalTeacher

    spec, enc, teacher, student = tiny_setup(tmp_path, tiny_tokenizer)
    with pytest.raises(ValueError, match="needs a teacher"):
        AD2Trainer(model=student, args=training_args(tmp_path / "a"), train_dataset=enc["train"], teacher=None,
                   ad2_config=AD2Config(method="kd"))  # fmt: skip
    with pytest.raises(ValueError, match="output_hidden_states"):
        AD2Trainer(model=student, args=training_args(tmp_path / "a"), train_dataset=enc["train"],
                   teacher=LocalTeacher(teacher), ad2_config=AD2Config(method="ad2-paper"))  # fmt: skip

    seen = []

    class RecordingTeacher(LocalTeacher):  # a Teacher given as is: the batch it sees keeps idx
        def __call__(self, batch):
            seen.append(batch["idx"].tolist())
            return super().__call__(batch)

    trainer = AD2Trainer(
        model=tiny_bert(num_labels=3, seed=3),
        args=training_args(tmp_path / "b", max_steps=2),
        train_dataset=enc["train"],
        data_collator=DataCollator(tiny_tokenizer.pad_token_id),
        teacher=RecordingTeacher(teacher),
        ad2_config=AD2Config(method="ad2-dkd"),
    )
    trainer.train()
    assert len(seen) == 2 and all(len(ids) == 4 for ids in seen)
    assert "ad2/ada" in trainer.state.log_history[0]


def test_accelerate_patches_still_apply():
    """ad2_ds.hf.reset_accelerator_state calls accelerate's private _reset_state; cpu_backend names gloo on CPU."""
    from accelerate.state import AcceleratorState, GradientState

    from ad2_ds.hf import cpu_backend, reset_accelerator_state

    assert callable(AcceleratorState._reset_state) and callable(GradientState._reset_state)
    reset_accelerator_state()
    assert AcceleratorState._shared_state == {}
    if not torch.cuda.is_available():
        (handler,) = cpu_backend()
        assert handler.to_kwargs()["backend"] == "gloo"


def _clean_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def recipe_inputs(tmp_path_factory):
    """CSV files and a tiny teacher folder (model + tokenizer) with named labels in another order than the data's."""
    from conftest import save_tiny_teacher

    root = tmp_path_factory.mktemp("recipe")
    data = write_csvs(root / "data")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS + [chr(ord("a") + i) for i in range(26)]) + "\n")
    teacher = save_tiny_teacher(root / "teacher", vocab, num_labels=3)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher)
    config.id2label = {0: "pos", 1: "neg", 2: "neutral"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.save_pretrained(teacher)
    return data, teacher


def _trainer_argv(data, teacher, out, *extra):
    # --method ad2-paper: every term, deep KD included, goes through the Trainer
    return [
        "--train_file", str(data / "train.csv"), "--validation_file", str(data / "dev.csv"),
        "--test_file", str(data / "test.csv"), "--teacher", str(teacher), "--student_layers", "bottom:1",
        "--output_dir", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
        "--max_seq_length", "16", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--method", "ad2-paper", *extra,
    ]  # fmt: skip


def _check_results(out, num_processes, deepspeed):
    from transformers import AutoModelForSequenceClassification

    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == num_processes and results["deepspeed_enabled"] is deepspeed
    # 18 examples, 4 per rank: ceil(18 / (4 x ranks)) steps per epoch, 2 epochs
    assert results["global_step"] == 2 * -(-18 // (4 * num_processes))
    for who in ("teacher", "student"):
        for split in ("dev", "test"):
            assert set(results[who][split]) >= {"accuracy", "macro_f1"}, (who, split)
    logged = [h for h in results["log_history"] if "loss" in h]
    assert logged and all("ad2/kd" in h and "ad2/ada" in h and "ad2/hidden" in h for h in logged)
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.id2label == {0: "neg", 1: "neutral", 2: "pos"} and student.config.num_hidden_layers == 1
    return results


def test_distill_trainer_recipe_in_process(recipe_inputs, tmp_path, capsys):
    from recipes import distill_trainer

    data, teacher = recipe_inputs
    assert distill_trainer.main(_trainer_argv(data, teacher, tmp_path / "run", "--use_cpu")) == 0
    _check_results(tmp_path / "run", 1, False)
    assert "| student (ad2-paper) |" in capsys.readouterr().out

    # bad input: one line, exit 2, nothing written
    bad_out = tmp_path / "bad"
    argv = _trainer_argv(data, teacher, bad_out, "--use_cpu", "--label_column", "lable")
    assert distill_trainer.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no column 'lable'" in err[-1] and "['text', 'label']" in err[-1]
    assert not bad_out.exists()


def test_distill_trainer_refuses_a_teacher_with_other_labels(recipe_inputs, tmp_path, capsys):
    from recipes import distill_trainer

    data, teacher = recipe_inputs
    other = tmp_path / "data"
    other.mkdir()
    for name in ("train", "dev", "test"):
        text = (data / f"{name}.csv").read_text().replace(",neutral", ",mixed")
        (other / f"{name}.csv").write_text(text)
    assert distill_trainer.main(_trainer_argv(other, teacher, tmp_path / "run", "--use_cpu")) == 2
    assert "are not the data's labels" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_distill_trainer_under_the_deepspeed_launcher_on_two_ranks(recipe_inputs, tmp_path):
    from ad2_ds.dist import find_free_port

    data, teacher = recipe_inputs
    out = tmp_path / "two"
    ds = str(REPO / "ds_configs" / "zero2_auto.json")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(find_free_port()), str(REPO / "recipes" / "distill_trainer.py"),
           *_trainer_argv(data, teacher, out, "--deepspeed", ds)]  # fmt: skip
    res = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_results(out, 2, True)


def test_distill_accelerate_with_the_deepspeed_plugin_on_two_ranks(recipe_inputs, tmp_path):
    from ad2_ds.dist import find_free_port

    data, teacher = recipe_inputs
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "ds_configs" / "accelerate_zero2.yaml"), "--main_process_port", str(find_free_port()),
           str(REPO / "recipes" / "distill_accelerate.py"),
           "--train_file", str(data / "train.csv"), "--validation_file", str(data / "dev.csv"),
           "--test_file", str(data / "test.csv"), "--teacher", str(teacher), "--student_layers", "bottom:1",
           "--output_dir", str(out), "--num_train_epochs", "2", "--batch_size", "4",
           "--max_seq_length", "16"]  # fmt: skip
    res = subprocess.run(cmd, env=_clean_env(), cwd=REPO, capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["distributed_type"] == "DistributedType.DEEPSPEED" and results["num_processes"] == 2
    assert [h["step"] for h in results["history"]] == [3, 6]  # 18 examples / (4 x 2 ranks): 3 steps an epoch
    assert set(results["student"]["test"]) == {"accuracy", "macro_f1"}
    assert set(results["teacher"]["test"]) == {"accuracy", "macro_f1"}


def test_distill_accelerate_bad_input_exits_2_before_any_model(recipe_inputs, tmp_path, capsys):
    from recipes import distill_accelerate

    data, teacher = recipe_inputs
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    argv = ["--train_file", str(data / "train.csv"), "--validation_file", str(empty), "--teacher", str(teacher),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert distill_accelerate.main(argv) == 2
    assert "empty.csv has no examples: the dev split is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_distill_accelerate_takes_the_objective_and_data_flags_of_distill_glue():
    from ad2_ds import AD2Config
    from ad2_ds.flags import from_flags
    from ad2_ds.run import DataConfig
    from recipes import distill_accelerate

    argv = ["--train_file", "a.csv", "--validation_file", "b.csv", "--teacher", "t", "--output_dir", "o",
            "--method", "ad2-dkd", "--perturb_norm", "token-l2", "--perturb_size", "relative", "--epsilon", "0.05",
            "--text_column", "question,sentence"]  # fmt: skip
    args = distill_accelerate.parse_args(argv)
    cfg = from_flags(AD2Config, vars(args))
    assert (cfg.method, cfg.perturb_norm, cfg.perturb_size, cfg.epsilon) == ("ad2-dkd", "token-l2", "relative", 0.05)
    assert cfg.step_size == AD2Config(method="ad2-dkd").step_size  # unset flags keep the preset's values
    data = DataConfig(train_file="a.csv", validation_file="b.csv", text_column=args.text_column)
    assert data.custom().text_columns == ("question", "sentence")


def test_distill_trainer_takes_the_objective_flags_of_distill_glue():
    from ad2_ds import AD2Config
    from recipes import distill_trainer

    base = ["--output_dir", "o", "--train_file", "a.csv", "--validation_file", "b.csv"]
    *_, cfg = distill_trainer.parse(base + ["--method", "ad2-dkd", "--perturb_norm", "token-l2", "--epsilon", "0.05"])
    assert (cfg.method, cfg.perturb_norm, cfg.epsilon) == ("ad2-dkd", "token-l2", 0.05)
    assert cfg.step_size == AD2Config(method="ad2-dkd").step_size  # unset flags keep the preset's values
    assert distill_trainer.parse(base)[-1] == AD2Config()  # no flag: the ad2 preset, as before


def test_ad2_trainer_takes_several_teachers_with_weights(tmp_path, tiny_tokenizer):
    """A list of teachers is one ensemble target; weights 1,0 train the student of the first teacher alone, bit for
    bit; bad weights and deep KD without a named source are refused before training."""
    from ad2_ds.hf import AD2Trainer
    from ad2_ds.teachers import EnsembleTeacher

    spec, enc, teacher, _ = tiny_setup(tmp_path, tiny_tokenizer)
    other = tiny_bert(num_labels=3, seed=5)
    cfg = AD2Config(method="ad2", epsilon=1e-2, step_size=1e-2)

    def trained(out, **kw):
        student = tiny_bert(num_labels=3, seed=2, hidden=16, layers=1, heads=2)
        collator = DataCollator(tiny_tokenizer.pad_token_id)
        trainer = AD2Trainer(model=student, args=training_args(tmp_path / out), train_dataset=enc["train"],
                             data_collator=collator, ad2_config=cfg, **kw)  # fmt: skip
        trainer.train()
        return trainer, student.state_dict()

    _, alone = trained("alone", teacher=teacher)
    trainer, first_only = trained("first", teacher=[teacher, other], teacher_weights=[1, 0])
    assert isinstance(trainer.teacher, EnsembleTeacher) and trainer.teacher.weights == (1.0, 0.0)
    assert all(torch.equal(alone[k], first_only[k]) for k in alone)
    trainer, mixed = trained("mixed", teacher=[teacher, other])
    assert trainer.teacher.weights == (0.5, 0.5) and all(s > 0 for s in trainer.teacher.seconds)
    assert any(not torch.equal(alone[k], mixed[k]) for k in alone)
    student = tiny_bert(num_labels=3, seed=2)
    for kw, message in (
        (dict(teacher=[teacher, other], teacher_weights=[1, -1]), ">= 0"),
        (dict(teacher=[teacher, other], teacher_weights=[1]), "1 teacher weights for 2"),
        (dict(teacher=[teacher, other], ad2_config=AD2Config(method="ad2-paper")), "hidden_source"),
    ):
        kw = {"ad2_config": cfg, **kw}
        with pytest.raises(ValueError, match=message):
            AD2Trainer(model=student, args=training_args(tmp_path / "bad"), train_dataset=enc["train"], **kw)
    trainer = AD2Trainer(model=student, args=training_args(tmp_path / "dkd", max_steps=2), train_dataset=enc["train"],
                         data_collator=DataCollator(tiny_tokenizer.pad_token_id), teacher=[teacher, other],
                         hidden_source=1, ad2_config=AD2Config(method="ad2-paper"))  # fmt: skip
    trainer.train()
    assert trainer.teacher.output_hidden_states and trainer.state.log_history[0]["ad2/hidden"] > 0
