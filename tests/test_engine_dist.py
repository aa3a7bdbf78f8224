"""The student under DeepSpeed on 2 gloo ranks: ZeRO-2 partitions optimizer state; 2 ranks x B == 1 rank x 2B."""

import pytest
import torch

from ad2_ds.testing import launch
from ad2_ds.trainer import epoch_batches

from conftest import random_batch, tiny_bert


def _engine(stage, micro_bs, mpu=None):
    import deepspeed

    from ad2_ds import AD2Config, AD2Objective

    student = tiny_bert(seed=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    objective = AD2Objective(student, AD2Config(method="ad2-dkd", epsilon=0.1, step_size=0.1))
    cfg = {
        "train_micro_batch_size_per_gpu": micro_bs,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(
        model=objective, optimizer=torch.optim.SGD(objective.parameters(), lr=0.5), config=cfg, mpu=mpu
    )
    return engine


def _first_step(rank, world_size, stage, global_bs):
    from ad2_ds import TeacherOutput
    from ad2_ds.dist import init_distributed

    init_distributed()
    micro = global_bs // world_size
    engine = _engine(stage, micro)
    full = random_batch(batch_size=global_bs, seq_len=8, seed=7)
    mine = {k: v[rank * micro : (rank + 1) * micro] for k, v in full.items()}
    teacher = tiny_bert(seed=1)
    with torch.no_grad():
        t = TeacherOutput(teacher(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"]).logits * 10)
    losses = engine(mine, t)
    engine.backward(losses["loss"])
    engine.step()
    loss = losses["loss"].detach().clone()
    torch.distributed.all_reduce(loss)
    params = [p.detach().clone() for p in engine.module.student.parameters()]
    partition = None
    if stage == 2:
        partition = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    total = sum(p.numel() for p in engine.module.parameters())
    return loss.item() / world_size, params, partition, total


def test_two_ranks_equal_one_rank_and_zero2_partitions():
    one = launch(_first_step, world_size=1, args=(2, 8), timeout_s=180)[0]
    two = launch(_first_step, world_size=2, args=(2, 8), timeout_s=180)
    assert two[0][0] == pytest.approx(one[0], rel=1e-5)  # mean of the ranks' losses == the 2B-batch loss
    for a, b in zip(one[1], two[0][1]):
        assert torch.allclose(a, b, atol=1e-6)  # same update: DeepSpeed averages the two ranks' gradients
    for a, b in zip(two[0][1], two[1][1]):
        assert torch.equal(a, b)  # ranks agree
    partitions, total = [r[2] for r in two], two[0][3]
    assert sum(partitions) >= total and max(partitions) <= total // 2 + 64  # each rank holds ~half the fp32 state
    assert one[2] >= total  # one rank holds everything


def test_epoch_batches_layouts_agree():
    # 1 rank x 2B and 2 ranks x B see the same global batches, every example each epoch, ending on a GA boundary
    one = epoch_batches(21, 4, seed=3, epoch=1, rank=0, world_size=1, grad_accum=2)
    r0 = epoch_batches(21, 2, seed=3, epoch=1, rank=0, world_size=2, grad_accum=2)
    r1 = epoch_batches(21, 2, seed=3, epoch=1, rank=1, world_size=2, grad_accum=2)
    assert [a + b for a, b in zip(r0, r1)] == one
    assert len(one) % 2 == 0 and set(i for b in one for i in b) == set(range(21))
    assert epoch_batches(21, 4, 3, 2, 0, 1) != epoch_batches(21, 4, 3, 1, 0, 1)  # reshuffled each epoch
    lengths = [i % 7 for i in range(40)]
    grouped = epoch_batches(40, 4, seed=0, epoch=0, rank=0, world_size=1, lengths=lengths)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped)
    assert sorted(i for b in grouped for i in b) == list(range(40)) and spread < 10  # similar lengths per batch


def _predict(rank, world_size, n):
    import datasets

    from ad2_ds.data.glue import DataCollator
    from ad2_ds.dist import init_distributed
    from ad2_ds.trainer import predict

    init_distributed()
    b = random_batch(batch_size=n, seq_len=8, seed=5)
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": [r[m.bool()].tolist() for r, m in zip(b["input_ids"], b["attention_mask"])],
            "attention_mask": [[1] * int(m.sum()) for m in b["attention_mask"]],
            "label": b["labels"].tolist(),
            "idx": list(range(n)),
        }
    )
    return predict(tiny_bert(seed=4), ds, DataCollator(0), batch_size=3)


@pytest.mark.parametrize("n", [11, 7])
def test_uneven_evaluation_counts_every_example_once(n):
    # n=11: 6 and 5 examples in batches of 3, rank 1's second batch is short; n=7: 4 and 3, rank 1 runs an extra
    # discarded batch so both ranks make the same number of forwards (ZeRO-3 gathers weights collectively)
    one = launch(_predict, world_size=1, args=(n,), timeout_s=120)[0]
    two = launch(_predict, world_size=2, args=(n,), timeout_s=120)
    assert one.shape == (n, 2)
    assert torch.allclose(torch.from_numpy(two[0]), torch.from_numpy(one), atol=1e-5)  # same order, same values
    assert torch.equal(torch.from_numpy(two[0]), torch.from_numpy(two[1]))  # every rank has all predictions
