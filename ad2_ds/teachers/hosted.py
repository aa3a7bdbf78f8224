"""The hosted layout: the teacher on ranks of its own, the student's ZeRO engine on the others::

    layout = dist.split_ranks(teacher_ranks=(0,))              # every rank; creates the groups
    if layout.role == "teacher":
        live = DeepSpeedTeacher(model, group=layout.teacher_group, output_hidden_states=True)   # or LocalTeacher
        serve_teacher(live, layout.teacher_ranks, layout.student_ranks, link_group=layout.link_group,
                      teacher_group=layout.teacher_group, hidden_layers=[2, 4])
    else:
        engine, *_ = deepspeed.initialize(..., mpu=dist.StudentGroupMPU.from_layout(layout))
        teacher = HostedTeacher(layout.teacher_of(rank), link_group=layout.link_group)
        out = teacher(batch)                                    # a TeacherOutput, as from a local teacher
        ...
        teacher.close()                                         # the server returns once every student closed

Student ranks are assigned to teacher ranks round-robin (:func:`ad2_ds.dist.assign_teacher_ranks`), an equal number
each. The server works in rounds: it takes one request from each of its students in a fixed order and runs the
wrapped teacher once per request. The ranks of a tensor-parallel teacher (a DeepSpeedTeacher over exactly the teacher
ranks) thus run it together, the j-th request of each, and the DeepSpeedTeacher gathers those requests into one batch.

Wire format, point-to-point on ``link_group`` (a group of its own, so it never interleaves with the student's
collectives on the student group, nor the TP teacher's on the teacher group). Request: an int64 header
``[op, (present, rows, length) for input_ids, attention_mask, token_type_ids]`` (op 1 = run, 0 = stop), then each
present tensor as int64. Response: an int64 header (:data:`_RESP_LEN` entries: status, logits shape, which hidden
layers, hidden and attention shapes and dtypes), then logits (fp32), the kept layer indices, the kept hidden states
stacked ``[n, B, T, H]`` and the attentions stacked ``[L, B, heads, T, T]``. Only the layers in ``hidden_layers`` are
sent (others come back as None in their slots), in ``transfer_dtype`` (fp16/bf16 halve the traffic).

With NCCL, the point-to-point ops run in the StreamingTeacher's thread next to the student's collectives in the main
thread; pass ``stream_teacher=False`` there unless your NCCL setup is known to take that.
"""

import time
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as tdist

from .. import dist
from .base import MODEL_INPUT_KEYS, Teacher, TeacherOutput, teacher_inputs

_OP_STOP, _OP_RUN = 0, 1
_REQ_LEN = 1 + 3 * len(MODEL_INPUT_KEYS)
# status, B, C, n_hidden_total (0: none), n_hidden_sent, T_h, H, hidden dtype, n_attn (0: none), heads, T_a, attn dtype
_RESP_LEN = 12
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FALLBACK = {"input_ids": [[0]], "attention_mask": [[1]], "token_type_ids": [[0]]}


def _device_for(group) -> torch.device:
    if torch.cuda.is_available() and tdist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _send(x: torch.Tensor, dst: int, group) -> None:
    tdist.send(x.contiguous(), dst, group=group)


def _recv(shape, dtype, src: int, group, device) -> torch.Tensor:
    x = torch.empty(tuple(shape), dtype=dtype, device=device)
    tdist.recv(x, src, group=group)
    return x


class HostedTeacher(Teacher):
    """A teacher living on another rank: ``teacher(batch)`` sends the batch's model inputs (the ``teacher_*`` ones
    when present) to ``teacher_rank`` and returns its :class:`TeacherOutput`. ``close()`` tells the server this
    student is done (also on ``with``-exit).

    teacher_rank: global rank of the serving teacher rank (``layout.teacher_of(rank)``).
    link_group: the group the server listens on (``layout.link_group``; None: the world).
    num_labels / output_hidden_states / output_attentions: what the server's teacher gives (informational, as on the
        other teachers). dtype: cast received hidden states and attentions to it (None: as sent).
    Attributes: ``wait_seconds`` (time spent in send + receive), ``requests``.
    """

    def __init__(
        self,
        teacher_rank: int,
        link_group=None,
        num_labels: Optional[int] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        dtype: Optional[torch.dtype] = None,
    ):
        self.teacher_rank, self.link_group = int(teacher_rank), link_group
        self.num_labels = num_labels
        self.output_hidden_states, self.output_attentions = output_hidden_states, output_attentions
        self.dtype = dtype
        self.device = _device_for(link_group)
        self.closed = False
        self._pending = None  # the sends of a request posted by send() and not yet received
        self.wait_seconds = 0.0
        self.requests = 0

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> TeacherOutput:
        self.send(batch)
        return self.receive()

    @torch.no_grad()
    def send(self, batch: Mapping[str, torch.Tensor]) -> None:
        """The first half of a call: post the request (non-blocking sends) and return; :meth:`receive` waits for the
        answer. An ensemble posts every hosted member's request first, so the members work at the same time and the
        student waits only for the slowest."""
        if self.closed:
            raise RuntimeError("HostedTeacher: called after close()")
        if self._pending is not None:
            raise RuntimeError("HostedTeacher: send() twice without receive()")
        t0 = time.perf_counter()
        inputs = teacher_inputs(batch)
        header = [_OP_RUN]
        for k in MODEL_INPUT_KEYS:
            x = inputs.get(k)
            if x is not None and x.dim() != 2:
                raise ValueError(f"HostedTeacher: {k} must be [B, T], got shape {tuple(x.shape)}")
            header += [0, 0, 0] if x is None else [1, *x.shape]
        dst, g = self.teacher_rank, self.link_group
        tensors = [torch.tensor(header, dtype=torch.int64, device=self.device)]
        tensors += [inputs[k].to(self.device, torch.int64).contiguous() for k in MODEL_INPUT_KEYS if k in inputs]
        self._pending = [(x, tdist.isend(x, dst, group=g)) for x in tensors]  # the tensors live until sent
        self.wait_seconds += time.perf_counter() - t0

    def receive(self) -> TeacherOutput:
        """The second half of a call: the answer to the request :meth:`send` posted."""
        t0 = time.perf_counter()
        for _, work in self._pending:
            work.wait()
        self._pending = None
        out = _recv_output(self.teacher_rank, self.link_group, self.device)
        self.wait_seconds += time.perf_counter() - t0
        self.requests += 1
        return out.to(dtype=self.dtype) if self.dtype is not None else out

    def close(self) -> None:
        """Send the stop message (once)."""
        if self.closed:
            return
        self.closed = True
        header = torch.zeros(_REQ_LEN, dtype=torch.int64, device=self.device)
        _send(header, self.teacher_rank, self.link_group)

    def __enter__(self) -> "HostedTeacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _recv_output(src: int, group, device) -> TeacherOutput:
    h = _recv((_RESP_LEN,), torch.int64, src, group, device).tolist()
    status, B, C, n_total, n_sent, T_h, H, dt_h, n_attn, heads, T_a, dt_a = h
    if status != 0:
        raise RuntimeError(f"HostedTeacher: the teacher on rank {src} failed on this request (see its log)")
    logits = _recv((B, C), torch.float32, src, group, device)
    hidden = None
    if n_total:
        hidden = [None] * n_total
        if n_sent:
            layers = _recv((n_sent,), torch.int64, src, group, device).tolist()
            stacked = _recv((n_sent, B, T_h, H), _DTYPES[dt_h], src, group, device)
            for j, i in enumerate(layers):
                hidden[i] = stacked[j]
    attn = None
    if n_attn:
        attn = list(_recv((n_attn, B, heads, T_a, T_a), _DTYPES[dt_a], src, group, device).unbind(0))
    return TeacherOutput(logits=logits, hidden_states=hidden, attentions=attn)


def _send_output(
    out: TeacherOutput, dst: int, group, device, hidden_layers: Optional[Sequence[int]], transfer_dtype
) -> None:
    def cast(x):
        return x.to(device=device, dtype=transfer_dtype or x.dtype)

    logits = out.logits.to(device, torch.float32)
    if logits.dim() == 1:
        logits = logits[:, None]
    B, C = logits.shape
    header = [0, B, C] + [0] * (_RESP_LEN - 3)
    layers: List[int] = []
    stacked_h = stacked_a = None
    if out.hidden_states is not None:
        total = len(out.hidden_states)
        wanted = range(total) if hidden_layers is None else hidden_layers
        layers = [i for i in wanted if hidden_layers is not None or out.hidden_states[i] is not None]
        missing = [i for i in layers if not 0 <= i < total or out.hidden_states[i] is None]
        if missing:
            raise ValueError(f"serve_teacher: hidden layers {missing} asked for, the teacher gave {total} (some None)")
        header[3:5] = [total, len(layers)]
        if layers:
            stacked_h = torch.stack([cast(out.hidden_states[i]) for i in layers])
            header[5:8] = [stacked_h.shape[2], stacked_h.shape[3], _DTYPES.index(stacked_h.dtype)]
    if out.attentions is not None and len(out.attentions):
        stacked_a = torch.stack([cast(a) for a in out.attentions])
        header[8:12] = [stacked_a.shape[0], stacked_a.shape[2], stacked_a.shape[3], _DTYPES.index(stacked_a.dtype)]
    _send(torch.tensor(header, dtype=torch.int64, device=device), dst, group)
    _send(logits, dst, group)
    if layers:
        _send(torch.tensor(layers, dtype=torch.int64, device=device), dst, group)
        _send(stacked_h, dst, group)
    if stacked_a is not None:
        _send(stacked_a, dst, group)


def _recv_request(src: int, group, device) -> Optional[Dict[str, torch.Tensor]]:
    h = _recv((_REQ_LEN,), torch.int64, src, group, device).tolist()
    if h[0] == _OP_STOP:
        return None
    inputs = {}
    for j, k in enumerate(MODEL_INPUT_KEYS):
        present, rows, length = h[1 + 3 * j : 4 + 3 * j]
        if present:
            inputs[k] = _recv((rows, length), torch.int64, src, group, device)
    return inputs


def serve_teacher(
    teacher: Teacher,
    teacher_ranks: Sequence[int],
    student_ranks: Sequence[int],
    link_group=None,
    teacher_group=None,
    hidden_layers: Optional[Sequence[int]] = None,
    transfer_dtype: Optional[torch.dtype] = None,
) -> Dict[str, object]:
    """Serve ``teacher`` to this teacher rank's students until all of them closed; returns stats
    (``requests`` per student rank, ``rounds``, ``teacher_seconds``).

    teacher_ranks / student_ranks: the layout (same on every rank); this rank must be one of the teacher ranks.
    link_group: the group the students send on (``layout.link_group``). teacher_group: the teacher ranks' group; when
        it has more than one rank they run in lockstep (needed for a TP teacher): per request slot they agree over it
        whether any of them still has a request, and one whose student already stopped re-runs its last request (the
        output is dropped), so the TP collectives stay matched even if students stop unevenly.
    hidden_layers: hidden-state indices to send (0 = embeddings); None: every layer the teacher gives.
    transfer_dtype: send hidden states and attentions in this dtype (torch.float16 / torch.bfloat16); logits always
        go in fp32.
    """
    rank = dist.get_rank()
    assignment = dist.assign_teacher_ranks(teacher_ranks, student_ranks)
    if rank not in teacher_ranks:
        raise ValueError(f"serve_teacher: rank {rank} is not one of the teacher ranks {list(teacher_ranks)}")
    if transfer_dtype not in (None,) + _DTYPES:
        raise ValueError(f"serve_teacher: transfer_dtype must be one of {_DTYPES}, got {transfer_dtype}")
    mine = [s for s, t in assignment.items() if t == rank]
    device = _device_for(link_group)
    lockstep = teacher_group is not None and dist.get_world_size(teacher_group) > 1
    active = {s: True for s in mine}
    last: Optional[Dict[str, torch.Tensor]] = None
    stats = {"requests": {s: 0 for s in mine}, "rounds": 0, "teacher_seconds": 0.0}
    while True:
        for s in mine:
            inputs = _recv_request(s, link_group, device) if active[s] else None
            if active[s] and inputs is None:
                active[s] = False
            anyone = torch.tensor([int(inputs is not None)], device=device)
            if lockstep:
                tdist.all_reduce(anyone, op=tdist.ReduceOp.MAX, group=teacher_group)
            if not anyone.item():
                continue
            run_on = inputs if inputs is not None else (last or {k: torch.tensor(v) for k, v in _FALLBACK.items()})
            t0 = time.perf_counter()
            try:
                out = teacher(run_on)
            except BaseException:
                if inputs is not None:  # do not leave the student waiting for an answer
                    header = torch.zeros(_RESP_LEN, dtype=torch.int64, device=device)
                    header[0] = 1
                    _send(header, s, link_group)
                raise
            stats["teacher_seconds"] += time.perf_counter() - t0
            if inputs is not None:
                last = inputs
                _send_output(out, s, link_group, device, hidden_layers, transfer_dtype)
                stats["requests"][s] += 1
        stats["rounds"] += 1
        still = torch.tensor([int(any(active.values()))], device=device)
        if lockstep:
            tdist.all_reduce(still, op=tdist.ReduceOp.MAX, group=teacher_group)
        if not still.item():
            return stats


def connect_hosted_teacher(layout, hidden_layers: Optional[Sequence[int]], num_labels: int, attentions: bool):
    """A student rank of the hosted layout: tell the teacher ranks which hidden layers to send (only those travel;
    None: no hidden states), then talk to this rank's teacher rank. The teacher ranks call :func:`serve_hosted`."""
    box = [list(hidden_layers) if hidden_layers is not None else None]
    tdist.broadcast_object_list(box, src=layout.student_ranks[0], group=layout.link_group)
    return HostedTeacher(
        layout.teacher_of(dist.get_rank()),
        link_group=layout.link_group,
        num_labels=num_labels,
        output_hidden_states=hidden_layers is not None,
        output_attentions=attentions,
    )


def serve_hosted(teacher: Teacher, layout) -> Dict[str, object]:
    """A teacher rank of the hosted layout: learn from the first student rank which hidden layers the students' layer
    map needs, then serve until every student closed (:func:`serve_teacher`'s stats)."""
    box = [None]
    tdist.broadcast_object_list(box, src=layout.student_ranks[0], group=layout.link_group)
    return serve_teacher(
        teacher,
        layout.teacher_ranks,
        layout.student_ranks,
        link_group=layout.link_group,
        teacher_group=layout.teacher_group,
        hidden_layers=box[0],
    )
