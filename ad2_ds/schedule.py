"""ε and η over a run, as ``--epsilon_schedule`` asks: the paper's future work (an annealed or a curriculum radius) and
CAT's growth on a plateau (Curriculum Adversarial Training, Cai et al. 2018: a stronger attack once training at the
current one stops improving).

    schedule = RadiusSchedule(cfg, total_steps=n)      # cfg: an AD2Config; n: the run's optimizer steps
    epsilon, step_size = schedule.at(step)             # step: optimizer steps done, 0 .. n - 1
    schedule.observe(loss, step)                       # plateau: the watched loss of the step just done
    saved = schedule.state_dict(); schedule.load_state_dict(saved)      # JSON data

The loop drives it through :class:`RadiusScheduleCallback` (``run_distillation`` adds one for any schedule but
constant): it sets the objective's ε and η before every optimizer step, writes the ones each step used to the
DeepSpeed monitor (``train/epsilon``, ``train/step_size``) and keeps the schedule's state in ``TrainState.schedule``,
which checkpoints hold, so ``--resume`` continues it bit for bit. The number of steps is the loop's own (its
micro-batches over the engine's gradient accumulation), not a setting: resuming with more epochs stretches a linear
or cosine schedule over the longer run.

Kinds (ε0, η0: ``epsilon``, ``step_size``; ε1, η1: ``epsilon_end``, ``step_size_end``; N steps, t = 0 .. N - 1):

- ``constant``: ε0, η0 (no callback: today's run, unchanged).
- ``linear``: s = t / (N - 1); ``cosine``: s = (1 - cos(π t / (N - 1))) / 2; then ε = ε0 + (ε1 - ε0)·s, η likewise:
  exactly ε0 at the first step and ε1 at the last (N = 1: ε0).
- ``plateau``: after n growths ε = min(ε0·fⁿ, ε1), η = min(η0·fⁿ, η1) (f: ``plateau_factor``). After each optimizer
  step the watched loss (``plateau_monitor``, its mean over the step's micro-batches and ranks) updates a running mean
  r = s·r + (1 - s)·loss (s: ``plateau_smoothing``; the first value starts it). A step whose r is not below the best r
  since the last growth does not improve; ``plateau_patience`` of those in a row grow ε and η once, and best, count and
  running mean start afresh (at a larger radius the adversarial loss is on another scale). Once both caps are reached
  it grows no more.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .trainer import Callback, _log_scalars


class RadiusSchedule:
    """ε and η at each optimizer step of a run of ``total_steps`` (see the module docstring); pure but for the
    plateau's state, which :meth:`observe` updates and :meth:`state_dict` returns."""

    def __init__(self, cfg, total_steps: int):
        (self.eps0, self.eps1), (self.eta0, self.eta1) = cfg.epsilon_range
        self.kind, self.total_steps = cfg.epsilon_schedule, int(total_steps)
        self.patience, self.factor, self.smoothing = cfg.plateau_patience, cfg.plateau_factor, cfg.plateau_smoothing
        self.grown_at: List[int] = []  # the steps after which ε grew (len: the number of growths n)
        self.best: Optional[float] = None
        self.bad_steps = 0
        self.running: Optional[float] = None

    def at(self, step: int) -> Tuple[float, float]:
        """(ε, η) for optimizer step ``step`` (0-based: the number of steps already done)."""
        if self.kind == "constant":
            return self.eps0, self.eta0
        if self.kind == "plateau":
            grow = self.factor ** len(self.grown_at)
            return min(self.eps0 * grow, self.eps1), min(self.eta0 * grow, self.eta1)
        last = self.total_steps - 1
        t = min(max(step, 0), last) / last if last > 0 else 0.0
        s = t if self.kind == "linear" else (1.0 - math.cos(math.pi * t)) / 2.0
        return _lerp(self.eps0, self.eps1, s), _lerp(self.eta0, self.eta1, s)

    @property
    def capped(self) -> bool:
        grow = self.factor ** len(self.grown_at)
        return self.eps0 * grow >= self.eps1 and self.eta0 * grow >= self.eta1

    def observe(self, value: float, step: int) -> bool:
        """Feed the watched loss of optimizer step ``step`` (plateau only); True when ε grew for the next step."""
        if self.kind != "plateau" or self.capped:
            return False
        value = float(value)
        s = self.smoothing
        self.running = value if self.running is None else s * self.running + (1.0 - s) * value
        if self.best is None or self.running < self.best:
            self.best, self.bad_steps = self.running, 0
            return False
        self.bad_steps += 1
        if self.bad_steps < self.patience:
            return False
        self.grown_at.append(int(step))
        self.best, self.bad_steps, self.running = None, 0, None
        return True

    def state_dict(self) -> dict:
        return {
            "grown_at": list(self.grown_at),
            "best": self.best,
            "bad_steps": self.bad_steps,
            "running": self.running,
        }

    def load_state_dict(self, state: dict) -> None:
        self.grown_at = [int(s) for s in state["grown_at"]]
        self.best, self.bad_steps, self.running = state["best"], int(state["bad_steps"]), state["running"]


def _lerp(a: float, b: float, s: float) -> float:
    """a + (b - a)·s, exactly a at s = 0, exactly b at s = 1, and exactly a everywhere when b == a."""
    return a + (b - a) * s if s < 0.5 else b - (b - a) * (1.0 - s)


class RadiusScheduleCallback(Callback):
    """Runs a :class:`RadiusSchedule` in :func:`ad2_ds.trainer.train` (see the module docstring). ``objective``: the
    :class:`~ad2_ds.objective.AD2Objective` the engine wraps; ``group``: the ranks the engine trains on."""

    def __init__(self, cfg, objective, engine, group=None):
        self.cfg, self.objective, self.engine, self.group = cfg, objective, engine, group
        self.schedule: Optional[RadiusSchedule] = None
        self._sum, self._count = 0.0, 0

    def on_train_start(self, state, total_micro_steps):
        self.schedule = RadiusSchedule(self.cfg, total_micro_steps // self.engine.gradient_accumulation_steps())
        if state.schedule is not None:  # resumed
            self.schedule.load_state_dict(state.schedule)
        self._sum, self._count = 0.0, 0
        self.objective.set_radius(*self.schedule.at(state.global_step))

    def on_micro_step(self, state, losses):
        if self.cfg.epsilon_schedule != "plateau":
            return
        value = float(losses[self.cfg.plateau_monitor])
        if math.isfinite(value):  # a skipped (non-finite) micro-batch says nothing about the plateau
            self._sum, self._count = self._sum + value, self._count + 1

    def on_optimizer_step(self, state, losses):
        epsilon, step_size = self.objective.epsilon, self.objective.step_size  # what this step used
        _log_scalars(self.engine, {"train/epsilon": epsilon, "train/step_size": step_size})
        if self.cfg.epsilon_schedule == "plateau":
            # on the loss's device: NCCL reduces CUDA tensors only
            total = torch.tensor([self._sum, float(self._count)], dtype=torch.float64, device=losses["loss"].device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
                dist.all_reduce(total, group=self.group)  # every rank decides alike: one ε for the whole run
            if total[1] > 0:
                self.schedule.observe(float(total[0] / total[1]), state.global_step)
            self._sum, self._count = 0.0, 0
        epsilon, step_size = self.schedule.at(state.global_step)
        state.schedule = {**self.schedule.state_dict(), "epsilon": epsilon, "step_size": step_size}
        self.objective.set_radius(epsilon, step_size)


def schedule_callbacks(cfg, objective, engine, group=None) -> list:
    """The callbacks the loop needs for ``cfg``'s radius schedule: none for a constant one."""
    return [] if cfg.epsilon_schedule == "constant" else [RadiusScheduleCallback(cfg, objective, engine, group)]


def require_constant(cfg, runner: str) -> None:
    """Refuse a radius schedule where no :func:`ad2_ds.trainer.train` loop drives it (``runner``: who refuses)."""
    if cfg.epsilon_schedule != "constant":
        raise ValueError(
            f"epsilon_schedule {cfg.epsilon_schedule}: {runner} runs a constant epsilon; schedules run in "
            "recipes/distill_glue.py"
        )
