"""The progress line a person reads: each phase labelled by what it does, a postfix of loss, ada and samples/s that
fits 120 columns, and every other loss term still in the DeepSpeed monitor."""

import io

import torch

from ad2_ds.checkpoint import TrainState
from ad2_ds.config import AD2Config
from ad2_ds.progress import ProgressBar, postfix, progress_iter
from ad2_ds.run import RunConfig
from ad2_ds.trainer import MonitorLog

# What an ad2 run's objective returns, with values as wide as a real run prints them
LOSSES = {"loss": 12.3456, "ce": 0.6931, "kd": 11.0421, "ada": 0.61234, "delta_norm_max": 0.99871,
          "delta_relative": 0.01234, "delta_applied": 1.0, "delta_cosine": -0.12345, "hidden/3-6": 0.5}  # fmt: skip


def _lines(text):
    return [ln for ln in text.replace("\r", "\n").split("\n") if ln.strip()]


def _render(label, ncols, t_start=0.0):
    out = io.StringIO()
    bar = ProgressBar(label, log_steps=1, t_start=t_start, initial=12_345, file=out, ncols=ncols)
    state = TrainState()
    bar.on_train_start(state, total_micro_steps=37_500)
    state.samples, state.micro_step_in_epoch = 1_234_567, 1
    bar.on_micro_step(state, {k: torch.tensor(v) for k, v in LOSSES.items()})
    bar.bar.refresh()
    text = out.getvalue()
    bar.on_train_end(state)
    return _lines(text)


def test_the_bar_shows_loss_ada_and_samples_per_second_within_120_columns():
    for label in ("teacher fine-tune", "fine-tune", "distill"):
        for ncols in (120, None):  # a 120-column terminal; a log file (no terminal: tqdm's own widths)
            lines = _render(label, ncols)
            assert lines, label
            last = lines[-1].rstrip()
            assert all(len(ln) <= 120 for ln in lines), [len(ln) for ln in lines]
            assert last.startswith(f"{label}:") and last.endswith("]"), last  # nothing cut off at the end
            assert "loss=12.3456" in last and "ada=0.6123" in last and "samples/s=" in last, last
            for other in ("ce=", "kd=", "delta_", "hidden"):
                assert other not in last, last


def test_the_postfix_keeps_only_what_the_method_has():
    assert list(postfix({"loss": torch.tensor(0.5), "ce": torch.tensor(0.5)}, 10.0)) == ["loss", "samples/s"]
    full = postfix({k: torch.tensor(v) for k, v in LOSSES.items()}, 1234.5)
    assert full == {"loss": "12.3456", "ada": "0.6123", "samples/s": "1234.5"}


def test_every_phase_is_labelled_by_what_it_does(capsys):
    from ad2_ds.default_teacher import finetune_config

    zero2 = "ds_configs/zero2.json"
    assert RunConfig(deepspeed=zero2).train_config().label == "distill"
    finetune = RunConfig(deepspeed=zero2, objective=AD2Config(method="finetune"), student="s")
    assert finetune.train_config().label == "fine-tune"  # a student fine-tuned without a teacher (the baseline)
    teacher_run = finetune_config(RunConfig(deepspeed=zero2), "runs/t", {"train_micro_batch_size_per_gpu": 4})
    assert teacher_run.train_config().label == "teacher fine-tune"
    capsys.readouterr()
    assert list(progress_iter(range(3), "teacher cache", total=3)) == [0, 1, 2]
    assert "teacher cache:   0%|" in capsys.readouterr().err  # leave=False: the bar goes once done
    assert progress_iter([1], "eval", show=False) == [1]  # --no_progress and the other ranks: no bar


class _Monitor:
    enabled = True

    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events += events


class _Engine:
    global_samples = 64

    def __init__(self):
        self.monitor = _Monitor()


def test_every_other_term_still_goes_to_the_monitor():
    engine = _Engine()
    log = MonitorLog(engine)
    log.on_optimizer_step(TrainState(), {k: torch.tensor(v) for k, v in LOSSES.items()})
    log.on_eval(TrainState(), {"step": 4, "epoch": 0, "accuracy": 0.75})
    names = {name for name, _, _ in engine.monitor.events}
    terms = {k for k in LOSSES if "/" not in k}
    assert {f"train/{k}" for k in terms} | {"eval/accuracy"} == names  # ce, kd, the delta statistics: all of them


def test_a_log_file_line_fits_120_columns_however_fast_the_run(monkeypatch):
    """No terminal (a log file, a pipe): tqdm alone prints the line as wide as its rates make it (125 columns at a
    million samples/s); the bar is capped at 120 and shrinks its meter instead, the postfix kept whole."""
    import time

    now = time.perf_counter()
    monkeypatch.setattr(time, "perf_counter", lambda: now + 1.0)  # 1,234,567 samples in 1 s: the widest rate
    lines = _render("teacher fine-tune", None, t_start=now)
    assert max(len(ln) for ln in lines) <= 120, [len(ln) for ln in lines]
    assert lines[-1].rstrip().endswith("samples/s=1234567.0]"), lines[-1]
