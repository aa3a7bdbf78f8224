"""ad2_ds.dist and the test launcher: variable-size gathers, failures and hangs reported, not hung on."""

import os

import pytest
import torch

from ad2_ds import dist
from ad2_ds.testing import launch


def _ragged_batch(rank):
    # rank 0: 3 rows of length 5, rank 1: 2 rows of length 7
    rows, length = (3, 5) if rank == 0 else (2, 7)
    ids = torch.arange(rows * length).reshape(rows, length) + 100 * (rank + 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(rows) + 10 * rank}


def _gather(rank, world_size):
    dist.init_distributed()
    mine = _ragged_batch(rank)
    gathered, info = dist.gather_batches(mine)
    back = {k: dist.slice_for_rank(v, info, seq_dims=(1,) if v.dim() > 1 else ()) for k, v in gathered.items()}
    return gathered, info, back, mine


def test_gather_batches_variable_rows_and_lengths():
    results = launch(_gather, world_size=2, timeout_s=60)
    g0, info, back0, mine0 = results[0]
    g1, _, back1, mine1 = results[1]
    assert info.sizes == (3, 2) and info.lengths == (5, 7)
    for k in g0:
        assert torch.equal(g0[k], g1[k])
    assert g0["input_ids"].shape == (5, 7)
    r1 = _ragged_batch(1)
    assert torch.equal(g0["input_ids"][3:], r1["input_ids"])
    assert torch.equal(g0["input_ids"][:3, :5], _ragged_batch(0)["input_ids"])
    assert (g0["input_ids"][:3, 5:] == 0).all() and (g0["attention_mask"][:3, 5:] == 0).all()
    assert torch.equal(g0["labels"], torch.tensor([0, 1, 2, 10, 11]))
    for back, mine in ((back0, mine0), (back1, mine1)):
        for k in mine:
            assert torch.equal(back[k], mine[k])


def _fail_on_rank_1(rank, world_size):
    dist.init_distributed()
    if rank == 1:
        raise KeyError("boom on rank one")
    torch.distributed.barrier()  # rank 0 would wait here forever: the launcher must kill it


def test_launch_propagates_a_rank_exception():
    with pytest.raises(RuntimeError, match="rank 1 .*boom on rank one"):
        launch(_fail_on_rank_1, world_size=2, timeout_s=60)


def _hang(rank, world_size):
    import time

    dist.init_distributed()
    if rank == 0:
        torch.distributed.barrier()  # HANG-0: rank 1 never joins
    time.sleep(60)  # HANG-1


def test_launch_times_out_on_a_hang_and_says_where_each_rank_was():
    import inspect

    with pytest.raises(TimeoutError) as info:
        launch(_hang, world_size=2, timeout_s=10)
    lines, first = inspect.getsourcelines(_hang)
    where = {tag: first + i for i, line in enumerate(lines) for tag in ("HANG-0", "HANG-1") if tag in line}
    msg = str(info.value)
    rank0, rank1 = msg.split("--- rank 0 ---")[1].split("--- rank 1 ---")
    assert f"line {where['HANG-0']} in _hang" in rank0 and f"line {where['HANG-1']} in _hang" in rank1


def _env(rank, world_size):
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "OMP_NUM_THREADS")}


def test_launch_sets_rank_env():
    envs = launch(_env, world_size=2, timeout_s=30)
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert all(e["WORLD_SIZE"] == "2" and e["LOCAL_SIZE"] == "2" and e["OMP_NUM_THREADS"] == "1" for e in envs)


def _parent(rank, world_size):
    dist.init_distributed()
    x = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(x)
    return os.getppid(), x.item()


def test_launch_forks_only_a_single_threaded_process():
    import threading

    assert all(ppid == os.getpid() and total == 3.0 for ppid, total in launch(_parent, world_size=2, timeout_s=60))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:  # another Python thread might hold a lock at the fork: the ranks come from a fork server instead
        served = launch(_parent, world_size=2, timeout_s=120)
        assert all(ppid != os.getpid() and total == 3.0 for ppid, total in served)
    finally:
        stop.set()
        other.join()


def _single(rank, world_size):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        os.environ.pop(k, None)
    dist.init_distributed()
    return dist.get_world_size(), dist.is_main_process(), os.environ["MASTER_ADDR"]


def test_init_distributed_in_a_plain_process():
    assert launch(_single, world_size=1, timeout_s=60) == [(1, True, "127.0.0.1")]


def test_single_process_env_defaults_and_torchrun_local_size(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    dist.setup_single_process_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    # under torchrun: the launcher's values are kept, LOCAL_WORLD_SIZE is copied for DeepSpeed's shm op
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29511")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    dist.setup_single_process_env()
    assert os.environ["RANK"] == "1" and os.environ["MASTER_PORT"] == "29511" and os.environ["LOCAL_SIZE"] == "2"


def _torch_first(rank, world_size):
    from ad2_ds.teachers.ds_inference import DeepSpeedTeacher

    from conftest import random_batch, tiny_bert

    torch.distributed.init_process_group("gloo")  # someone else initialized torch.distributed first
    dist.init_distributed()
    dist.init_distributed()  # idempotent
    out = DeepSpeedTeacher(tiny_bert(), tp_size=2)(random_batch(seed=rank))
    return out.logits.shape


def test_init_distributed_after_torch_init_and_twice():
    assert launch(_torch_first, world_size=2, timeout_s=60) == [torch.Size([4, 2])] * 2
