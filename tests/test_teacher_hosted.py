"""The hosted layout: the teacher on its own ranks serves the student ranks over point-to-point ops; the student's
ZeRO engine trains on the student ranks only (gloo, 2-4 ranks)."""

import pytest
import torch

from ad2_ds import dist
from ad2_ds.teachers.local import LocalTeacher
from ad2_ds.testing import launch

from conftest import random_batch, tiny_bert


def test_round_robin_assignment_and_uneven_split_refused():
    assert dist.assign_teacher_ranks([0], [1, 2]) == {1: 0, 2: 0}
    assert dist.assign_teacher_ranks([0, 1], [2, 3, 4, 5]) == {2: 0, 3: 1, 4: 0, 5: 1}
    with pytest.raises(ValueError, match="not a multiple"):
        dist.assign_teacher_ranks([0, 1], [2, 3, 4])
    assert dist.parse_ranks("0, 1") == (0, 1) and dist.parse_ranks(None) == ()


def _local_reference(batch, layers=2):
    return LocalTeacher(tiny_bert(seed=1, layers=layers), output_hidden_states=True, output_attentions=True)(batch)


def _hosted_first_step(rank, world_size):
    from ad2_ds import TeacherOutput
    from ad2_ds.teachers.hosted import HostedTeacher, serve_teacher

    dist.init_distributed()
    layout = dist.split_ranks([0])
    if layout.role == "teacher":
        teacher = LocalTeacher(tiny_bert(seed=1), output_hidden_states=True, output_attentions=True)
        stats = serve_teacher(
            teacher, layout.teacher_ranks, layout.student_ranks, link_group=layout.link_group, hidden_layers=[0, 2]
        )
        return "teacher", stats
    from test_engine_dist import _engine

    engine = _engine(2, 4, mpu=dist.StudentGroupMPU.from_layout(layout))
    i = layout.student_ranks.index(rank)
    full = random_batch(batch_size=8, seq_len=8, seed=7)
    mine = {k: v[i * 4 : (i + 1) * 4] for k, v in full.items()}
    with HostedTeacher(layout.teacher_of(rank), link_group=layout.link_group) as teacher:
        out = teacher(mine)
        ref = _local_reference(mine)
        losses = engine(mine, TeacherOutput(out.logits * 10))
        engine.backward(losses["loss"])
        engine.step()
    params = [p.detach().clone() for p in engine.module.student.parameters()]
    partition = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    dp_ranks = torch.distributed.get_process_group_ranks(engine.data_parallel_group)
    return "student", (out, ref, params, partition, dp_ranks, engine.dp_world_size)


def test_hosted_teacher_on_rank0_and_zero2_student_on_ranks_1_2_equal_colocated():
    from test_engine_dist import _first_step

    colocated = launch(_first_step, world_size=2, args=(2, 8), timeout_s=180)
    results = launch(_hosted_first_step, world_size=3, timeout_s=180)
    role, stats = results[0]
    assert role == "teacher" and stats["requests"] == {1: 1, 2: 1} and stats["rounds"] == 2  # 1 request + the stops
    total = sum(p.numel() for p in colocated[0][1])
    for rank in (1, 2):
        role, (out, ref, params, partition, dp_ranks, dp_world) = results[rank]
        assert role == "student" and dp_ranks == [1, 2] and dp_world == 2
        assert torch.equal(out.logits, ref.logits)
        assert len(out.hidden_states) == 3 and out.hidden_states[1] is None  # only the layers asked for travel
        assert torch.equal(out.hidden_states[0], ref.hidden_states[0])
        assert torch.equal(out.hidden_states[2], ref.hidden_states[2])
        assert all(torch.equal(a, b) for a, b in zip(out.attentions, ref.attentions))
        for a, b in zip(params, colocated[rank - 1][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # the same first step as teacher + student on 2 ranks
        assert partition <= total // 2 + 64  # ZeRO-2 still halves the optimizer state over the 2 student ranks
    assert any(not torch.equal(a, b) for a, b in zip(results[1][1][2], _initial_student_params()))  # it did train


def _initial_student_params():
    return [p.detach().clone() for p in tiny_bert(seed=2).parameters()]  # the student test_engine_dist._engine builds


def _bf16_and_teacher_keys(rank, world_size):
    from ad2_ds.teachers.hosted import HostedTeacher, serve_teacher

    dist.init_distributed()
    layout = dist.split_ranks([1])  # the teacher need not be rank 0
    if layout.role == "teacher":
        teacher = LocalTeacher(tiny_bert(seed=1), output_hidden_states=True)
        return serve_teacher(
            teacher, (1,), (0,), link_group=layout.link_group, hidden_layers=[2], transfer_dtype=torch.bfloat16
        )
    t = random_batch(batch_size=3, seq_len=9, seed=5)
    batch = dict(random_batch(seed=6), **{"teacher_" + k: t[k] for k in ("input_ids", "attention_mask")})
    teacher = HostedTeacher(1, link_group=layout.link_group, dtype=torch.float32)
    out = teacher(batch)
    teacher.close()
    teacher.close()  # idempotent: no second stop message
    ref = LocalTeacher(tiny_bert(seed=1), output_hidden_states=True)(
        {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}
    )
    return out, ref


def test_bf16_transfer_and_teacher_prefixed_inputs():
    out, ref = launch(_bf16_and_teacher_keys, world_size=2, timeout_s=120)[0]
    assert out.logits.shape == (3, 2) and torch.equal(out.logits, ref.logits)  # logits always travel in fp32
    assert out.hidden_states[0] is None and out.hidden_states[1] is None and out.attentions is None
    h = out.hidden_states[2]
    assert h.dtype == torch.float32 and h.shape == ref.hidden_states[2].shape
    assert torch.equal(h, ref.hidden_states[2].to(torch.bfloat16).float())  # exactly the bf16 rounding


def _tp_teacher_on_0_1(rank, world_size):
    from ad2_ds.teachers.ds_inference import DeepSpeedTeacher
    from ad2_ds.teachers.hosted import HostedTeacher, serve_teacher

    dist.init_distributed()
    layout = dist.split_ranks([0, 1])
    if layout.role == "teacher":
        teacher = DeepSpeedTeacher(
            tiny_bert(seed=1), group=layout.teacher_group, output_hidden_states=True, output_attentions=True
        )
        assert teacher.engine.module.bert.encoder.layer[0].attention.self.query.weight.shape[0] == 16  # sharded
        return serve_teacher(
            teacher,
            layout.teacher_ranks,
            layout.student_ranks,
            link_group=layout.link_group,
            teacher_group=layout.teacher_group,
        )
    teacher = HostedTeacher(layout.teacher_of(rank), link_group=layout.link_group)
    results = []
    # ragged across students (rows, lengths), and student 2 asks twice while student 3 asks once: the TP ranks must
    # still run together (rank 1 re-runs its last request while rank 0 serves the second one)
    for call in range(2 if rank == 2 else 1):
        batch = random_batch(batch_size=2 + rank % 2, seq_len=6 + rank + call, seed=40 + rank + 10 * call)
        results.append((teacher(batch), _local_reference(batch)))
    teacher.close()
    # the student group still works on its own after the teacher is gone
    x = torch.tensor([rank])
    torch.distributed.all_reduce(x, group=layout.student_group)
    return results, x.item()


def test_tp2_teacher_on_ranks_0_1_serves_students_2_3():
    results = launch(_tp_teacher_on_0_1, world_size=4, timeout_s=240)
    assert results[0]["requests"] == {2: 2} and results[1]["requests"] == {3: 1}
    for rank in (2, 3):
        pairs, total = results[rank]
        assert total == 5 and len(pairs) == (2 if rank == 2 else 1)
        for out, ref in pairs:
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
            for h, h_ref in zip(out.hidden_states, ref.hidden_states):
                torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
            for a, a_ref in zip(out.attentions, ref.attentions):
                assert a.shape == a_ref.shape  # all heads, gathered over the TP ranks
                torch.testing.assert_close(a, a_ref, atol=1e-5, rtol=1e-5)
