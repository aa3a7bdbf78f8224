"""MixKD's term: the teacher labels the mixed embeddings; λ = 1 is the clean input; what cannot label new points is
refused before anything loads."""

import json
from pathlib import Path

import pytest
import torch

from ad2_ds import mixup
from ad2_ds.config import AD2Config, ConfigError
from ad2_ds.mixup import MixTeacher
from ad2_ds.objective import AD2Objective
from ad2_ds.teachers.local import LocalTeacher

from conftest import random_batch, save_tiny_teacher, tiny_bert, write_glue_fixture

ROOT = Path(__file__).resolve().parents[1]


def _objective(method="kd", **kw):
    # eval mode: no dropout, so forwards can be recomputed exactly; wide weights: logits far from uniform
    student = tiny_bert(seed=2, layers=1, initializer_range=0.5)
    teacher = tiny_bert(seed=1, layers=2, initializer_range=0.5)
    objective = AD2Objective(student, AD2Config(method=method, mixup_alpha=0.4, **kw), teacher_config=teacher.config)
    objective.mix_teacher = MixTeacher(LocalTeacher(teacher))
    return objective, student, teacher


def _by_hand(model, batch, perm, lam):
    """The model's logits on λ e(x_i) + (1 - λ) e(x_perm[i]), the masks' union, x_i's segments: written out here."""
    e = model.bert.embeddings.word_embeddings.weight[batch["input_ids"]]
    w = lam.view(-1, 1, 1)
    mask = batch["attention_mask"]
    union = (mask.bool() | (mask[perm].bool() & (lam < 1).view(-1, 1))).long()
    return model(inputs_embeds=w * e + (1 - w) * e[perm], attention_mask=union,
                 token_type_ids=batch["token_type_ids"]).logits  # fmt: skip


def _kl(logits_s, logits_t):
    p_t = logits_t.softmax(-1)
    return (p_t * (p_t.log() - logits_s.log_softmax(-1))).sum(-1).mean()


def test_the_mixed_points_are_labelled_by_the_teachers_forward_on_mixed_embeddings():
    objective, student, teacher = _objective()
    batch = random_batch(batch_size=6, seq_len=10)
    torch.manual_seed(0)
    losses = objective(batch, LocalTeacher(teacher)(batch))
    perm, lam = objective.last_mix
    assert sorted(perm.tolist()) == list(range(6)) and perm.tolist() != list(range(6))
    assert ((lam >= 0.5) & (lam <= 1)).all() and (lam < 0.99).any()
    with torch.no_grad():
        logits_t, logits_s = _by_hand(teacher, batch, perm, lam), _by_hand(student, batch, perm, lam)
    assert torch.allclose(losses["mix"], _kl(logits_s, logits_t), atol=1e-6)
    # not the approximation "mixed teacher probabilities of the two clean points", which is no teacher label
    with torch.no_grad():
        p = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits.softmax(-1)
    w = lam.view(-1, 1)
    approx = (w * p + (1 - w) * p[perm]).log()
    assert abs(float(losses["mix"]) - float(_kl(logits_s, approx))) > 1e-4
    assert torch.allclose(losses["loss"], losses["ce"] + losses["kd"] + losses["mix"], atol=1e-6)
    # the same draw again: the CPU generator decides the pairs and λ
    torch.manual_seed(0)
    again = objective(batch, LocalTeacher(teacher)(batch))
    assert torch.equal(again["mix"], losses["mix"]) and torch.equal(objective.last_mix[0], perm)


def test_lambda_one_is_the_clean_input(monkeypatch):
    objective, _, teacher = _objective(mixup_weight=0.5)
    batch = random_batch(batch_size=6, seq_len=10)  # rows of other lengths: the partner's mask must not leak in
    monkeypatch.setattr(mixup, "draw_mix", lambda b, alpha: (torch.randperm(b), torch.ones(b)))
    losses = objective(batch, LocalTeacher(teacher)(batch))
    assert torch.allclose(losses["mix"], losses["kd"], atol=1e-6)
    assert torch.allclose(losses["loss"], losses["ce"] + 1.5 * losses["kd"], atol=1e-6)


def test_the_mixed_forward_trains_the_student_through_its_word_embeddings():
    objective, student, _ = _objective(w_kd=0.0, w_ce=0.0)
    batch = random_batch()
    losses = objective(batch, LocalTeacher(tiny_bert(seed=1, layers=2))(batch))
    losses["loss"].backward()
    grad = student.bert.embeddings.word_embeddings.weight.grad
    assert set(losses) >= {"mix", "loss"} and grad is not None and grad.abs().sum() > 0


def test_with_adversarial_the_mix_term_comes_after_the_ascent_and_adds_one_student_and_one_teacher_forward():
    objective, student, teacher = _objective(method="ad2")
    counts = {"s": 0, "t": 0}
    student.bert.encoder.register_forward_hook(lambda *a: counts.__setitem__("s", counts["s"] + 1))
    teacher.bert.encoder.register_forward_hook(lambda *a: counts.__setitem__("t", counts["t"] + 1))
    batch = random_batch()
    t_out = LocalTeacher(teacher)(batch)
    counts.update(s=0, t=0)
    losses = objective(batch, t_out)
    assert {"ce", "kd", "ada", "mix", "delta_norm_max"} <= set(losses)
    assert counts == {"s": 3, "t": 1}  # clean, adversarial, mixed; the teacher once, on the mixed batch


def test_a_teacher_that_cannot_label_new_points_is_refused():
    from ad2_ds.run import RunConfig

    objective = AD2Config(method="kd", mixup_alpha=0.4)
    for kwargs, field in (({"teacher_cache": "c"}, "teacher_cache"), ({"teacher_tp_size": 2}, "teacher_tp_size"),
                          ({"teacher_ranks": (0,)}, "teacher_ranks")):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            RunConfig(objective=objective, **kwargs)
        assert e.value.field == field and "mixup_alpha" in str(e.value)
    RunConfig(objective=AD2Config(method="kd", mixup_alpha=0.0), teacher_cache="c")  # mixup off: a cache is fine
    with pytest.raises(ValueError, match="cannot run"):
        MixTeacher(object())
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        AD2Config(mixup_alpha=-1.0)


def test_a_cache_with_mixup_is_one_line_and_exit_2_before_any_model_loads(tmp_path, tiny_vocab, capsys, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from recipes import distill_glue

    data = write_glue_fixture(tmp_path / "glue")
    teacher = save_tiny_teacher(tmp_path / "teacher", tiny_vocab)
    ds = tmp_path / "ds.json"
    ds.write_text((ROOT / "ds_configs" / "zero2.json").read_text())
    loaded = []
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", lambda *a, **k: loaded.append(a))
    out = tmp_path / "out"
    argv = ["--deepspeed", str(ds), "--task", "sst2", "--data_dir", str(data), "--teacher", str(teacher),
            "--output_dir", str(out), "--no_progress", "--mixup_alpha", "0.4",
            "--teacher_cache", str(tmp_path / "c")]  # fmt: skip
    capsys.readouterr()
    assert distill_glue.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --teacher_cache ") and "mixup_alpha" in err[0], err
    assert loaded == [] and not out.exists() and not (tmp_path / "c").exists()
    assert json.loads(ds.read_text())  # nothing of the user's touched


def _mix_losses(deepspeed, stage, steps=3):
    teacher, student = tiny_bert(seed=1, initializer_range=0.5), tiny_bert(seed=2, initializer_range=0.5)
    objective = AD2Objective(student, AD2Config(method="kd", mixup_alpha=0.4), teacher_config=teacher.config)
    objective.mix_teacher = MixTeacher(LocalTeacher(teacher))
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}  # fmt: skip
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=opt, config=config)
    torch.manual_seed(0)
    out = []
    for step in range(steps):
        batch = random_batch(batch_size=4, seed=step)
        losses = engine(batch, LocalTeacher(teacher)(batch))
        engine.backward(losses["loss"])
        engine.step()
        out.append(float(losses["mix"]))
    return out


def test_zero3_partitioned_student_mixes_and_trains_like_stage_0(one_rank):
    """Under ZeRO-3 the word embeddings are called outside the model's forward: they must still be gathered, and
    their gradient from the mixed batch must reach the optimizer (the later losses depend on it)."""
    plain, zero3 = _mix_losses(one_rank, 0), _mix_losses(one_rank, 3)
    assert len(set(plain)) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(plain, zero3)), (plain, zero3)


def test_ad2_trainer_labels_the_mixed_points_with_its_teacher_and_refuses_one_that_cannot(tmp_path, tiny_tokenizer):
    from test_hf_trainer import tiny_setup, training_args

    from ad2_ds.data.glue import DataCollator
    from ad2_ds.hf import AD2Trainer
    from ad2_ds.teachers.base import Teacher

    _, enc, teacher, student = tiny_setup(tmp_path, tiny_tokenizer)
    common = dict(args=training_args(tmp_path / "run"), train_dataset=enc["train"],
                  data_collator=DataCollator(tiny_tokenizer.pad_token_id))  # fmt: skip
    trainer = AD2Trainer(model=student, teacher=teacher, ad2_config=AD2Config(method="kd", mixup_alpha=0.4), **common)
    assert trainer.objective.mix_teacher.teacher.model is teacher
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(h["ad2/mix"] > 0 for h in logged)

    class Precomputed(Teacher):  # stands for a cache: outputs on known examples only
        num_labels = 3

    with pytest.raises(ValueError, match="Precomputed cannot run"):
        AD2Trainer(model=student, teacher=Precomputed(), ad2_config=AD2Config(method="kd", mixup_alpha=0.4), **common)
