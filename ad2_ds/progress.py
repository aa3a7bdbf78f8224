"""The progress line a person reads: one tqdm bar per phase, labelled by what the phase does.

    bar = ProgressBar("distill", log_steps=10, t_start=time.perf_counter(), initial=0)   # a trainer Callback
    for batch in progress_iter(loader, "teacher cache", total=len(loader)): ...          # any other loop

The phases and their labels: ``teacher fine-tune`` (the default teacher's fine-tuning, recipes/finetune_teacher.py),
``fine-tune`` (method finetune on a student), ``distill``, ``teacher cache`` (the one teacher pass that builds a
cache), ``eval`` (scoring the dev split during training). The training bar's postfix holds at most the loss, the
adversarial term (``ada``) and samples/s, so the line fits 120 columns; every other term (``ce``, ``kd``, the delta
statistics, ...) goes to the DeepSpeed monitor (:class:`ad2_ds.trainer.MonitorLog`: CSV / TensorBoard / wandb).
"""

import shutil
import sys
import time
from typing import Dict, Iterable, Optional

import torch

from .checkpoint import TrainState

POSTFIX_TERMS = ("loss", "ada")  # the terms the bar shows; the monitor gets them all
MAX_COLUMNS = 120


def bar_width(file=None, ncols: Optional[int] = None) -> int:
    """The bar's width: ``ncols`` if given, else the terminal's capped at 120, and 120 for a file or a pipe (tqdm
    alone would print a log file's line as wide as its rate and postfix make it)."""
    if ncols:
        return ncols
    stream = file if file is not None else sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        return min(shutil.get_terminal_size((MAX_COLUMNS, 24)).columns, MAX_COLUMNS)
    return MAX_COLUMNS


def postfix(losses: Dict[str, torch.Tensor], samples_per_second: float) -> Dict[str, str]:
    """The bar's postfix: the loss, the adversarial term when the method has one, and samples/s."""
    shown = {k: f"{losses[k].item():.4f}" for k in POSTFIX_TERMS if k in losses}
    return shown | {"samples/s": f"{samples_per_second:.1f}"}


class ProgressBar:
    """A tqdm bar over the run's micro-steps (a :class:`ad2_ds.trainer.Callback`), labelled ``label``, with
    :func:`postfix` every ``log_steps``. ``file`` / ``ncols``: where and how wide (default: stderr, the terminal's)."""

    def __init__(
        self, label: str, log_steps: int, t_start: float, initial: int, file=None, ncols: Optional[int] = None
    ):
        self.label, self.log_steps, self.t_start, self.initial, self.bar = label, log_steps, t_start, initial, None
        self.file, self.ncols = file, ncols

    def on_train_start(self, state: TrainState, total_micro_steps: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_micro_steps, initial=self.initial, desc=self.label, unit="batch",
                        ncols=bar_width(self.file, self.ncols), file=self.file)  # fmt: skip

    def on_micro_step(self, state: TrainState, losses: Dict[str, torch.Tensor]) -> None:
        self.bar.update(1)
        if state.micro_step_in_epoch % self.log_steps == 0:
            elapsed = time.perf_counter() - self.t_start
            self.bar.set_postfix(postfix(losses, state.samples / max(elapsed, 1e-9)))

    def on_optimizer_step(self, state, losses) -> None: ...

    def on_eval(self, state, record) -> None: ...

    def on_train_end(self, state: TrainState) -> None:
        self.bar.close()


def progress_iter(items: Iterable, label: str, total: Optional[int] = None, show: bool = True) -> Iterable:
    """``items`` with a bar labelled ``label`` that goes away when done (``show=False``: ``items`` as they are)."""
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=label, total=total, unit="batch", leave=False, ncols=bar_width())
