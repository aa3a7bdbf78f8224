"""Run the teacher one or two batches ahead of the student, in a background thread::

    stream = StreamingTeacher(teacher, train_loader)        # or inline=True to run it in the loop itself
    for batch, out_t in stream:                             # out_t = teacher(batch), already computed
        loss = objective(engine(**student_inputs(batch)), out_t)
        engine.backward(loss); engine.step()
    print(stream.wait_seconds)                              # time the loop spent waiting for the teacher

A producer thread pulls batches, runs the teacher (which releases the GIL inside torch ops) and puts
(batch, output) into a queue of ``queue_size`` (default 2) while the student works on the current batch. An exception
in the producer (data loading or teacher) is re-raised in the consumer at the batch where it happened. On CUDA the
teacher runs on a side stream; the consumer's stream waits on an event recorded after it, so no host sync is needed.

Tensor-parallel teachers: :class:`~ad2_ds.teachers.ds_inference.DeepSpeedTeacher` communicates only on process
groups of its own, so its collectives in the producer thread never interleave with the student's on the default group
(each group keeps its own order on every rank). That is safe with gloo (tested here). With NCCL, two communicators
driven concurrently from two threads can deadlock when ranks enqueue their kernels in different orders; on GPU pass
``inline=True`` for a TP teacher unless you have checked your NCCL setup (a DeepSpeedTeacher on CUDA defaults to it).
"""

import queue
import threading
import time
from typing import Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from .base import Teacher, TeacherOutput

_DONE = object()


def _to_device(batch: Mapping[str, torch.Tensor], device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _tensors_of(out: TeacherOutput) -> List[torch.Tensor]:
    ts = [out.logits]
    for seq in (out.hidden_states, out.attentions):
        ts.extend(t for t in seq or () if t is not None)
    return ts


class StreamingTeacher:
    """Iterate over (batch, teacher(batch)) with the teacher computed ahead in a background thread.

    batches: any iterable of batch dicts (a DataLoader; one pass). device: move batches there before the teacher
    (non_blocking) and yield them there. inline: no thread, compute in ``__next__`` (same outputs, same order).
    Attributes: ``wait_seconds`` (total time ``__next__`` blocked), ``step_waits`` (per batch).
    """

    def __init__(
        self,
        teacher: Teacher,
        batches: Iterable[Mapping[str, torch.Tensor]],
        queue_size: int = 2,
        device=None,
        inline: Optional[bool] = None,
    ):
        if inline is None:
            from .ds_inference import DeepSpeedTeacher

            members = getattr(teacher, "members", [teacher])  # an ensemble is inline when one of its members is
            inline = torch.cuda.is_available() and any(
                isinstance(m, DeepSpeedTeacher) and m.tp_size > 1 for m in members
            )
        self.teacher, self.device, self.inline = teacher, device, inline
        self._it = iter(batches)
        self.wait_seconds = 0.0
        self.step_waits: List[float] = []
        self._stop = threading.Event()
        self._queue: "queue.Queue" = queue.Queue(maxsize=queue_size)
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() and not inline else None
        self._thread = None
        if not inline:
            self._thread = threading.Thread(target=self._produce, name="teacher-producer", daemon=True)
            self._thread.start()

    def _compute(self, batch) -> Tuple[dict, TeacherOutput, Optional["torch.cuda.Event"]]:
        if self._stream is None:
            batch = _to_device(batch, self.device) if self.device is not None else batch
            return batch, self.teacher(batch), None
        with torch.cuda.stream(self._stream):
            batch = _to_device(batch, self.device) if self.device is not None else batch
            out = self.teacher(batch)
            event = torch.cuda.Event()
            event.record(self._stream)
        return batch, out, event

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for batch in self._it:
                if self._stop.is_set() or not self._put(self._compute(batch)):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def __iter__(self) -> Iterator[Tuple[dict, TeacherOutput]]:
        return self

    def __next__(self) -> Tuple[dict, TeacherOutput]:
        t0 = time.perf_counter()
        if self.inline:
            batch = next(self._it)  # StopIteration ends the loop
            item = self._compute(batch)
        else:
            item = self._queue.get()
        waited = time.perf_counter() - t0
        if item is _DONE or isinstance(item, BaseException):
            self._stop.set()
            if item is _DONE:
                raise StopIteration
            raise item
        self.wait_seconds += waited
        self.step_waits.append(waited)
        batch, out, event = item
        if event is not None:
            current = torch.cuda.current_stream()
            current.wait_event(event)
            # memory made on the side stream is now used on this one
            for t in _tensors_of(out) + [v for v in batch.values() if torch.is_tensor(v) and v.is_cuda]:
                t.record_stream(current)
        return batch, out

    def close(self) -> None:
        """Stop the producer (also when the consumer leaves the loop early)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "StreamingTeacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
