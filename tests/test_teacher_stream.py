"""StreamingTeacher: same outputs in the same order as in-line, producer errors re-raised, teacher time hidden."""

import time

import pytest
import torch

from ad2_ds import dist
from ad2_ds.teachers.local import LocalTeacher
from ad2_ds.teachers.stream import StreamingTeacher
from ad2_ds.testing import launch

from conftest import random_batch, tiny_bert


def _batches(n=6, seed=0):
    out = []
    for i in range(n):
        b = random_batch(batch_size=3, seq_len=6 + i % 3, seed=seed + i)
        b["idx"] = torch.arange(3 * i, 3 * i + 3)
        out.append(b)
    return out


def _collect(stream):
    return [(b["idx"].clone(), o.logits, o.hidden_states[-1]) for b, o in stream]


def test_streaming_equals_inline_same_order():
    teacher = LocalTeacher(tiny_bert(), output_hidden_states=True)
    inline = _collect(StreamingTeacher(teacher, _batches(), inline=True))
    streamed = _collect(StreamingTeacher(teacher, _batches()))
    assert len(streamed) == len(inline) == 6
    for (i1, l1, h1), (i2, l2, h2) in zip(inline, streamed):
        assert torch.equal(i1, i2) and torch.equal(l1, l2) and torch.equal(h1, h2)


class _Sleepy:
    """A teacher taking ``seconds`` per batch, optionally failing on one batch."""

    output_hidden_states = output_attentions = False

    def __init__(self, seconds, fail_at=None):
        self.seconds, self.fail_at, self.calls = seconds, fail_at, 0
        self.inner = LocalTeacher(tiny_bert())

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError(f"teacher failed on batch {self.calls}")
        time.sleep(self.seconds)
        return self.inner(batch)


def test_producer_exception_reaches_the_consumer_at_its_batch():
    seen = []
    with pytest.raises(ValueError, match="teacher failed on batch 3"):
        for batch, _ in StreamingTeacher(_Sleepy(0.0, fail_at=3), _batches()):
            seen.append(int(batch["idx"][0]))
    assert seen == [0, 3]

    def broken_loader():
        yield _batches(1)[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(StreamingTeacher(_Sleepy(0.0), broken_loader()))


def _run(teacher_s, student_s, inline):
    stream = StreamingTeacher(_Sleepy(teacher_s), _batches(8), inline=inline)
    t0 = time.perf_counter()
    for _ in stream:
        time.sleep(student_s)  # the student's step
    return stream, time.perf_counter() - t0


def test_wait_is_near_zero_when_the_teacher_is_faster_than_the_student():
    fast, total_fast = _run(teacher_s=0.02, student_s=0.08, inline=False)
    inline, total_inline = _run(teacher_s=0.02, student_s=0.08, inline=True)
    # only the first batch waits for the teacher; afterwards it is always ready
    assert max(fast.step_waits[1:]) < 0.01, fast.step_waits
    assert inline.wait_seconds > 8 * 0.02 * 0.9 and fast.wait_seconds < inline.wait_seconds / 2
    assert total_fast < total_inline
    slow, _ = _run(teacher_s=0.08, student_s=0.0, inline=False)
    assert slow.wait_seconds > 0.5  # a slow teacher is not hidden: the wait is measured, not assumed


def test_close_stops_the_producer_after_an_early_break():
    stream = StreamingTeacher(_Sleepy(0.0), _batches(20))
    for _ in stream:
        break
    stream.close()
    assert not stream._thread.is_alive()


def _stream_tp(rank, world_size):
    from ad2_ds.teachers.ds_inference import DeepSpeedTeacher

    dist.init_distributed()
    teacher = DeepSpeedTeacher(tiny_bert(), tp_size=2, output_hidden_states=True)
    mine = _batches(5, seed=10 * rank)
    inline = _collect(StreamingTeacher(teacher, mine, inline=True))
    streamed = []
    for batch, out in StreamingTeacher(teacher, mine):
        # the "student" communicates on the default group while the producer thread runs the TP teacher's
        # collectives on the teacher's own group
        x = torch.ones(1000) * (rank + 1)
        torch.distributed.all_reduce(x)
        assert x[0].item() == 3.0
        streamed.append((batch["idx"].clone(), out.logits, out.hidden_states[-1]))
    ref = LocalTeacher(tiny_bert())
    live = [ref(b).logits for b in mine]
    return inline, streamed, live


def test_streaming_a_tp_teacher_next_to_student_collectives():
    for inline, streamed, live in launch(_stream_tp, world_size=2, timeout_s=120):
        assert len(streamed) == len(inline) == 5
        for (i1, l1, h1), (i2, l2, h2), l_ref in zip(inline, streamed, live):
            assert torch.equal(i1, i2) and torch.equal(l1, l2) and torch.equal(h1, h2)
            torch.testing.assert_close(l2, l_ref, atol=1e-5, rtol=1e-5)
