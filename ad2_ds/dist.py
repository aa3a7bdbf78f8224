"""Distributed helpers: ``init_distributed()`` at the top of a recipe, ``clean_exit(0)`` at its end.

Works the same under ``python script.py`` (one rank: the env defaults are filled in here), ``torchrun`` and the
``deepspeed`` launcher, on CPU (gloo) and GPU (nccl)::

    from ad2_ds import dist
    dist.init_distributed()
    ...
    gathered, info = dist.gather_batches(batch, group)      # variable-size micro-batches of a group
    mine = dist.slice_for_rank(out, info, seq_dims=(1,))    # back to this rank's rows and length
    dist.clean_exit(0)

See ``/work/shared/notes/deepspeed-on-cpu.md`` for why each default is what it is.
"""

import os
import socket
import sys
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist

from . import patches
from .patches import default_group  # noqa: F401  (re-exported: its home was here)

# Pad values used when micro-batches of different sequence lengths are stacked (the attention mask pads with 0,
# so padded positions are invisible to the model; labels pad with the HF ignore index).
DEFAULT_PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "labels": -100}


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_single_process_env() -> None:
    """Fill in the env a launcher would set, so a plain ``python script.py`` is a one-rank job.

    Only missing variables are set. Also copies torchrun's ``LOCAL_WORLD_SIZE`` into ``LOCAL_SIZE`` (DeepSpeed's shm
    op only sets itself up when ``LOCAL_SIZE`` equals the world size; torchrun + TP inference otherwise segfaults), and
    sets ``OMP_NUM_THREADS`` to cores // local ranks when unset (two ranks on two cores with the default thread
    count run ~20x slower). OMP_NUM_THREADS is read when torch's thread pool starts, so call this early.
    """
    env = os.environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        # No launcher at all: a one-rank job. Never pick a port when a launcher set RANK (it owns MASTER_PORT).
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(find_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    if "LOCAL_WORLD_SIZE" in env:
        env.setdefault("LOCAL_SIZE", env["LOCAL_WORLD_SIZE"])
    if "OMP_NUM_THREADS" not in env:
        local_size = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", env.get("WORLD_SIZE", "1"))))
        threads = max(1, (os.cpu_count() or 1) // max(1, local_size))
        env["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def init_distributed(backend: Optional[str] = None, shm_op: bool = False, timeout_s: Optional[float] = None) -> None:
    """``deepspeed.init_distributed`` with this project's defaults; idempotent.

    backend: "gloo" without CUDA, else "nccl".
    shm_op: build DeepSpeed's shared-memory all-reduce op on CPU. Off by default: it is JIT-compiled on first use
        (~24 s cold) and crashes TP inference when ``LOCAL_SIZE`` is wrong; gloo's all_reduce is correct without it.
    """
    import deepspeed

    setup_single_process_env()
    on_gpu = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if on_gpu else "gloo"
    if not on_gpu and not shm_op:
        patches.no_shm_op()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {}
    if timeout_s is not None:
        from datetime import timedelta

        kwargs["timeout"] = timedelta(seconds=timeout_s)
    # Also when torch.distributed is already up (e.g. initialized by another library): DeepSpeed then only wraps the
    # existing default group in its comm backend, which its inference engine needs.
    from .master_port import check_master_port, port_in_use_as_one_line, remember_own_port

    if not tdist.is_initialized():
        check_master_port()  # a port another job holds: one line, not torch's traceback
    with port_in_use_as_one_line():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **kwargs)
    remember_own_port()


def get_rank(group=None) -> int:
    return tdist.get_rank(group) if tdist.is_available() and tdist.is_initialized() else 0


def get_world_size(group=None) -> int:
    return tdist.get_world_size(group) if tdist.is_available() and tdist.is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0, and in a process that never initialized torch.distributed."""
    return get_rank() == 0


def clean_exit(code: int = 0) -> None:
    """End the process without the random SIGABRT at interpreter exit (a gloo worker thread freeing work while
    Python shuts down): destroy the process group without a barrier, flush, then ``os._exit``. atexit handlers
    do not run."""
    try:
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass(frozen=True)
class GatherInfo:
    """Where each rank's micro-batch sits in a gathered batch.

    sizes: rows per rank (group rank order); lengths: each rank's sequence length (dim 1 of ``length_key``, 0 when
    absent); rank: this process's rank in the group.
    """

    sizes: Tuple[int, ...]
    lengths: Tuple[int, ...]
    rank: int

    @property
    def offsets(self) -> Tuple[int, ...]:
        out, acc = [], 0
        for n in self.sizes:
            out.append(acc)
            acc += n
        return tuple(out)


def _pad_to(x: torch.Tensor, shape: Sequence[int], value) -> torch.Tensor:
    if tuple(x.shape) == tuple(shape):
        return x
    out = x.new_full(tuple(shape), value)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def gather_batches(
    batch: Mapping[str, torch.Tensor],
    group=None,
    pad_values: Optional[Mapping[str, object]] = None,
    length_key: str = "input_ids",
) -> Tuple[Dict[str, torch.Tensor], GatherInfo]:
    """Concatenate the micro-batches of every rank of ``group`` (rank order) along dim 0; all ranks get the same.

    Micro-batches may differ in rows and in every other dim (sequence length): shapes are all_gathered first,
    each tensor is padded to the largest shape with ``pad_values[key]`` (defaults: :data:`DEFAULT_PAD_VALUES`, else 0),
    gathered, and the padding rows are dropped again; the padding along the other dims stays (attention_mask pads
    with 0, so it is invisible to the model). Non-tensor values are dropped. Every rank must pass the same keys.
    Returns the gathered batch and a :class:`GatherInfo` for :func:`slice_for_rank`.
    """
    pads = dict(DEFAULT_PAD_VALUES, **(pad_values or {}))
    keys = sorted(k for k, v in batch.items() if torch.is_tensor(v))
    world = get_world_size(group)
    me = get_rank(group)
    meta = (keys, [tuple(batch[k].shape) for k in keys], [str(batch[k].dtype) for k in keys])
    if world == 1:
        metas = [meta]
    else:
        metas = [None] * world
        tdist.all_gather_object(metas, meta, group=group)
    for r, (k_r, s_r, d_r) in enumerate(metas):
        if k_r != keys or d_r != meta[2] or [len(s) for s in s_r] != [len(s) for s in meta[1]]:
            raise ValueError(
                f"gather_batches: rank {r} of the group passed keys/dtypes/shapes {list(zip(k_r, d_r, s_r))}, "
                f"this rank (group rank {me}) passed {list(zip(keys, meta[2], meta[1]))}; "
                "every rank must pass the same keys"
            )
    sizes = tuple(int(s_r[0][0]) if s_r else 0 for _, s_r, _ in metas)
    if length_key in keys:
        i = keys.index(length_key)
        lengths = tuple(int(s_r[i][1]) if len(s_r[i]) > 1 else 0 for _, s_r, _ in metas)
    else:
        lengths = tuple(0 for _ in metas)
    info = GatherInfo(sizes=sizes, lengths=lengths, rank=me)
    if world == 1:
        return {k: batch[k] for k in keys}, info
    out = {}
    for i, k in enumerate(keys):
        max_shape = [max(s_r[i][d] for _, s_r, _ in metas) for d in range(len(meta[1][i]))]
        x = _pad_to(batch[k].contiguous(), max_shape, pads.get(k, 0))
        parts = [torch.empty_like(x) for _ in range(world)]
        tdist.all_gather(parts, x, group=group)
        out[k] = torch.cat([p[: sizes[r]] for r, p in enumerate(parts)], dim=0)
    return out, info


def slice_for_rank(
    x: Optional[torch.Tensor], info: GatherInfo, rank: Optional[int] = None, seq_dims: Sequence[int] = ()
) -> Optional[torch.Tensor]:
    """This rank's rows of a tensor computed on a gathered batch, cropped back to its own sequence length.

    x: [sum(sizes), ...]; seq_dims: the dims that are sequence positions (hidden states [B, T, H]: (1,); attentions
    [B, heads, T, T]: (2, 3); logits [B, C]: ()). None passes through.
    """
    if x is None:
        return None
    rank = info.rank if rank is None else rank
    start = info.offsets[rank]
    x = x[start : start + info.sizes[rank]]
    for d in seq_dims:
        x = x.narrow(d, 0, info.lengths[rank])
    # A copy: a view would keep the whole group's gathered tensor alive as long as this rank's output lives (in a
    # streaming queue, one or two batches ahead), doubling the memory a TP=2 teacher's hidden states take.
    return x.clone()


def assign_teacher_ranks(teacher_ranks: Sequence[int], student_ranks: Sequence[int]) -> Dict[int, int]:
    """The fixed student -> teacher rank mapping of the hosted layout: round-robin (the i-th student rank is served
    by teacher rank ``teacher_ranks[i % len(teacher_ranks)]``).

    Raises ``ValueError`` unless the number of student ranks is a multiple of the number of teacher ranks: a
    tensor-parallel teacher's ranks must run together, so each must serve the same number of requests per round.
    """
    teachers, students = list(teacher_ranks), list(student_ranks)
    if not teachers or not students:
        raise ValueError(f"hosted layout: need teacher and student ranks, got {teachers} and {students}")
    if len(students) % len(teachers):
        raise ValueError(
            f"hosted layout: {len(students)} student ranks {students} are not a multiple of the {len(teachers)} "
            f"teacher ranks {teachers}; every teacher rank must serve the same number of students (a tensor-parallel "
            "teacher's ranks run together)"
        )
    return {s: teachers[i % len(teachers)] for i, s in enumerate(students)}


@dataclass(frozen=True)
class HostedLayout:
    """Who does what in the hosted layout (see :func:`split_ranks`).

    role: "teacher" or "student" for this rank. teacher_group / student_group: process groups of exactly those
    ranks (the TP teacher runs on the first, the student's DeepSpeed engine on the second). link_group: all ranks,
    used only for the teacher <-> student point-to-point traffic, so it never shares a group with anybody's
    collectives. mp_group: a group of this rank alone (the model-parallel group a :class:`StudentGroupMPU` reports);
    None on teacher ranks.
    """

    role: str
    teacher_ranks: Tuple[int, ...]
    student_ranks: Tuple[int, ...]
    teacher_group: object
    student_group: object
    link_group: object
    mp_group: object = None

    @property
    def assignment(self) -> Dict[int, int]:
        return assign_teacher_ranks(self.teacher_ranks, self.student_ranks)

    def students_of(self, teacher_rank: int) -> Tuple[int, ...]:
        return tuple(s for s, t in self.assignment.items() if t == teacher_rank)

    def teacher_of(self, student_rank: int) -> int:
        return self.assignment[student_rank]

    def __iter__(self):  # role, teacher_group, student_group = split_ranks(...)
        return iter((self.role, self.teacher_group, self.student_group))


def parse_ranks(spec: Optional[str]) -> Tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``; None or ``""`` -> ``()``."""
    if not spec:
        return ()
    return tuple(int(x) for x in str(spec).split(",") if x.strip())


def check_teacher_ranks(teacher_ranks: Sequence[int], world_size: Optional[int] = None) -> None:
    """The one check of a hosted layout's teacher ranks: distinct, >= 0, and below ``world_size`` when known."""
    bad = len(set(teacher_ranks)) < len(teacher_ranks) or any(r < 0 for r in teacher_ranks)
    if bad or (world_size is not None and any(r >= world_size for r in teacher_ranks)):
        where = f"[0, {world_size})" if world_size is not None else "the world"
        raise ValueError(f"teacher ranks {list(teacher_ranks)} must be distinct ranks of {where}")


def split_ranks(teacher_ranks: Sequence[int]) -> HostedLayout:
    """Split the world into teacher and student ranks and create their process groups (a collective: every rank
    calls it, with the same ``teacher_ranks``).

    Groups are created in the same order on every rank: teacher, student, link, then one single-rank group per
    student rank (``new_group`` needs every rank of the world to take part in each creation).
    """
    return split_member_ranks((teacher_ranks,))[0]  # one member: its link group is the world


def split_member_ranks(groups: Sequence[Sequence[int]]) -> Tuple[Optional[HostedLayout], ...]:
    """Several teachers, each member hosted on ranks of its own (``groups[m]``; empty: member m runs co-located on
    the student ranks): one :class:`HostedLayout` per hosted member (None for a co-located one), all sharing the
    student group, each with its own teacher group and link group (its teacher ranks and every student rank), so one
    member's traffic and collectives never meet another's. A collective: every rank calls it with the same groups.
    A layout's role is "teacher" on its member's ranks, "student" on the student ranks, "other" on another member's.
    """
    world, rank = get_world_size(), get_rank()
    hosted = sorted(int(r) for g in groups for r in g)
    check_teacher_ranks(hosted, world)
    students = tuple(r for r in range(world) if r not in hosted)
    members = [tuple(sorted(int(r) for r in g)) for g in groups]
    for g in members:
        if g:
            assign_teacher_ranks(g, students)  # raises on an uneven split
    teacher_groups = [tdist.new_group(list(g)) if g else None for g in members]
    student_group = tdist.new_group(list(students))
    links = [tdist.new_group(sorted(set(g) | set(students))) if g else None for g in members]
    mp_group = None
    for s in students:
        g = tdist.new_group([s])
        if s == rank:
            mp_group = g
    role = "student" if rank in students else None
    return tuple(
        HostedLayout(role or ("teacher" if rank in g else "other"), g, students, tg, student_group, link, mp_group)
        if g else None
        for g, tg, link in zip(members, teacher_groups, links)
    )  # fmt: skip


class StudentGroupMPU:
    """The ``mpu`` that makes ``deepspeed.initialize(..., mpu=StudentGroupMPU(layout))`` train on the student ranks
    only: data parallel over ``student_group``, no model parallelism (a group of this rank alone; DeepSpeed's
    gradient-norm code all-reduces over the model-parallel group, so None would mean the world and hang)."""

    def __init__(self, student_group, mp_group):
        self.dp_group, self.mp_group = student_group, mp_group

    @classmethod
    def from_layout(cls, layout: HostedLayout) -> "StudentGroupMPU":
        if layout.role != "student":
            raise ValueError("StudentGroupMPU: this rank is a teacher rank of the hosted layout")
        return cls(layout.student_group, layout.mp_group)

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return tdist.get_rank(self.dp_group)

    def get_data_parallel_world_size(self) -> int:
        return tdist.get_world_size(self.dp_group)

    def get_data_parallel_group_ranks(self):
        return tdist.get_process_group_ranks(self.dp_group)

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
