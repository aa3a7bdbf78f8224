"""The public API inside a hand-written deepspeed.initialize loop on one CPU rank (what users embed)."""

import pytest
import torch

from ad2_ds import AD2Config, AD2Objective, TeacherOutput
from ad2_ds.dsconfig import single_rank_config, skip_single_rank_allreduce

from conftest import random_batch, tiny_bert


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_public_api_in_a_deepspeed_loop(one_rank, stage):
    deepspeed = one_rank
    teacher, student = tiny_bert(seed=1, layers=4), tiny_bert(seed=2, layers=2, hidden=16).train()
    # --- what a user writes (the loop below is the whole integration) ---
    objective = AD2Objective(student, AD2Config(method="ad2-paper", epsilon=1e-3), teacher_config=teacher.config)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
    }
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds_config)
    proj_before = objective.projections["1"].weight.detach().clone()
    history = []
    for step in range(8):
        batch = random_batch(batch_size=4, seq_len=8, seed=step % 2)
        with torch.no_grad():
            o = teacher(
                **{k: batch[k] for k in ("input_ids", "attention_mask")},
                output_hidden_states=True,
                output_attentions=True,
            )
        losses = engine(batch, TeacherOutput(o.logits * 10, o.hidden_states, o.attentions))
        engine.backward(losses["loss"])
        engine.step()
        history.append(losses["loss"].item())
    # --- end of the user's loop ---
    assert engine.global_steps == 4  # 8 micro-batches, accumulation 2: DeepSpeed owns the accounting
    assert all(torch.isfinite(torch.tensor(history)))
    assert sum(history[-2:]) < sum(history[:2])  # two fixed batches, learning happens
    assert not torch.equal(proj_before, objective.projections["1"].weight.detach())  # projections trained too


def _train(deepspeed, wrap_objective, stage, steps=4, single_rank_path=False):
    """SGD, dropout off, accumulation 2: wrapping the objective or only the student must give the same weights."""
    teacher, student = tiny_bert(seed=1), tiny_bert(seed=2)
    cfg = AD2Config(method="ad2-dkd", epsilon=0.1, step_size=0.1)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    if single_rank_path:
        ds_config, note = single_rank_config(ds_config, data_parallel_size=1)
        assert ds_config["zero_optimization"] == {"stage": 0} and (note is not None) == (stage != 0)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    if wrap_objective:
        engine, *_ = deepspeed.initialize(model=AD2Objective(student, cfg), optimizer=opt, config=ds_config)
        objective = engine
    else:
        engine, *_ = deepspeed.initialize(model=student, optimizer=opt, config=ds_config)
        objective = AD2Objective(engine, cfg)
    if single_rank_path:
        assert skip_single_rank_allreduce(engine) and not engine.enable_backward_allreduce
    for step in range(steps):
        batch = random_batch(batch_size=4, seed=step)
        with torch.no_grad():
            t = TeacherOutput(teacher(input_ids=batch["input_ids"]).logits * 10)
        losses = objective(batch, t)
        if step == 0:
            assert all(p.grad is None for p in student.parameters())  # the ascent wrote no parameter grads
        engine.backward(losses["loss"])
        engine.step()
    assert engine.global_steps == steps // 2
    return [p.detach().clone() for p in student.parameters()]


@pytest.mark.parametrize("stage", [0, 2])
def test_objective_over_an_engine_wrapped_student(one_rank, stage):
    wrapped_objective = _train(one_rank, True, stage)
    wrapped_student = _train(one_rank, False, stage)
    initial = [p.detach() for p in tiny_bert(seed=2).parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(wrapped_student, initial))  # it trained
    for a, b in zip(wrapped_objective, wrapped_student):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 2])
def test_single_rank_path_gives_the_configs_weights(one_rank, stage):
    """ZeRO-2 run at stage 0 without the all-reduce over one rank: the weights of the config as written."""
    as_written = _train(one_rank, True, stage)
    fast = _train(one_rank, True, stage, single_rank_path=True)
    for a, b in zip(as_written, fast):
        assert torch.allclose(a, b, atol=1e-6)


def test_single_rank_config_leaves_what_it_must():
    z2 = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2, "overlap_comm": True}}
    assert single_rank_config(z2, data_parallel_size=2) == (z2, None)  # several ranks: ZeRO partitions
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert single_rank_config(offload, 1) == (offload, None)  # offload still moves state off the accelerator
    z3 = {"zero_optimization": {"stage": 3}}
    assert single_rank_config(z3, 1) == (z3, None)
    cfg, note = single_rank_config(z2, 1)
    assert cfg == {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}} and "stage 2" in note
    assert z2["zero_optimization"]["stage"] == 2  # the caller's dict is not changed
