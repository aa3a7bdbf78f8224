"""The loop's guards, in-process on one rank: a non-finite loss is skipped on every rank and counted, and a run
that keeps producing one stops with a clear error."""

import datasets
import pytest
import torch

from ad2_ds import AD2Config, AD2Objective, TeacherOutput
from ad2_ds.data.glue import DataCollator
from ad2_ds.data.tasks import get_task
from ad2_ds.teachers import LocalTeacher
from ad2_ds.trainer import NonFiniteLossError, TrainConfig, train

from conftest import random_batch, tiny_bert


class PoisonedTeacher:
    """A live teacher whose logits are NaN for the examples in ``poisoned``: an injected fault."""

    def __init__(self, model, poisoned):
        self.inner, self.poisoned = LocalTeacher(model), set(poisoned)

    def __call__(self, batch):
        out = self.inner(batch)
        bad = torch.tensor([int(i) in self.poisoned for i in batch["idx"]])
        return TeacherOutput(torch.where(bad.unsqueeze(-1), torch.full_like(out.logits, float("nan")), out.logits))


def _data(n):
    b = random_batch(batch_size=n, seq_len=8, seed=3)
    rows = {
        "input_ids": [r[m.bool()].tolist() for r, m in zip(b["input_ids"], b["attention_mask"])],
        "label": b["labels"].tolist(),
        "idx": list(range(n)),
    }
    rows["attention_mask"] = [[1] * len(r) for r in rows["input_ids"]]
    return datasets.Dataset.from_dict(rows)


def _engine(deepspeed):
    from ad2_ds.engine import build_engine

    objective = AD2Objective(tiny_bert(seed=2).train(), AD2Config(method="kd"))
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}
    cfg["zero_allow_untested_optimizer"] = True
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    return build_engine(objective, cfg, optimizer=opt, single_rank_path=False)[0]


def test_nonfinite_loss_is_skipped_and_counted(one_rank, tmp_path):
    engine = _engine(one_rank)
    train_ds, dev = _data(16), _data(8)
    teacher = PoisonedTeacher(tiny_bert(seed=1), poisoned={3, 11})
    cfg = TrainConfig(output_dir=str(tmp_path), num_train_epochs=2, group_by_length=False, progress=False)
    state = train(engine, teacher, train_ds, {"dev": dev}, DataCollator(0), get_task("sst2"), cfg)
    # each epoch, the micro-batches holding example 3 or 11 are skipped (1 or 2 of the 4, by the shuffle)
    assert 2 <= state.nonfinite_skipped <= 4
    assert engine.global_steps == 8 - state.nonfinite_skipped
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_a_loss_that_stays_nonfinite_stops_the_run(one_rank, tmp_path):
    engine = _engine(one_rank)
    teacher = PoisonedTeacher(tiny_bert(seed=1), poisoned=range(16))
    cfg = TrainConfig(output_dir=str(tmp_path), num_train_epochs=2, max_nonfinite_steps=3, progress=False)
    with pytest.raises(NonFiniteLossError, match="3 micro-batches in a row"):
        train(engine, teacher, _data(16), {"dev": _data(8)}, DataCollator(0), get_task("sst2"), cfg)
    assert engine.global_steps == 0
