"""The distillation loop: thin, top to bottom, resumable.

    state = train(engine, teacher, train_ds, dev_sets, collator, task, TrainConfig(output_dir="runs/x"),
                  on_best=save_best)

The only engine calls are ``engine(batch, teacher_output)``, ``engine.backward``, ``engine.step`` and
``engine.save_checkpoint`` / ``load_checkpoint``. The engine wraps an :class:`~ad2_ds.objective.AD2Objective`.

Data order is a pure function of (seed, epoch): each global batch is a contiguous slice of the epoch's permutation,
split across ranks, so 1 rank x 2B and 2 ranks x B see the same global batches, and a resumed run can skip exactly the
micro-batches it already consumed. Checkpoints are taken at optimizer-step boundaries with the RNG states, so a
resumed run continues bit for bit.
"""

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import TrainState, load_state, save_state, world
from .data.glue import example_lengths
from .progress import ProgressBar, progress_iter  # noqa: F401  (ProgressBar: re-exported, its home was here)
from .teachers.base import Teacher

logger = logging.getLogger(__name__)
CKPT_DIR = "checkpoints"


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the next optimizer step. ``signum`` says which."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(f"interrupted by signal {signum}: checkpoint saved in {checkpoint}; continue with --resume")
        self.signum = signum


class NonFiniteLossError(RuntimeError):
    """The loss stayed inf/NaN for too many micro-batches in a row."""


class _StopSignals:
    """Turns the first SIGTERM/SIGINT into a request to checkpoint and stop; a second one stops at once."""

    def __init__(self):
        self.requested = 0
        self._old = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            self.__exit__()
            raise KeyboardInterrupt
        self.requested = signum
        logger.warning("signal %d: saving a checkpoint at the next optimizer step, then stopping", signum)

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def _sync_flags(loss: torch.Tensor, stop: int, group=None) -> tuple:
    """(any rank's loss non-finite, any rank asked to stop): one tiny all_reduce, so every rank decides alike."""
    flags = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0, float(stop)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return bool(flags[0]), int(flags[1])


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    num_train_epochs: int = 3
    eval_steps: int = 0  # optimizer steps between evaluations; 0: once per epoch
    seed: int = 42
    group_by_length: bool = True
    stream_teacher: bool = True  # teacher runs one batch ahead in a background thread
    log_steps: int = 10
    progress: bool = True
    label: str = "distill"  # the progress bar's (ad2_ds.progress): what this run does
    max_nonfinite_steps: int = 10  # consecutive inf/NaN micro-batches (skipped) before the run stops

    def __post_init__(self):
        if self.num_train_epochs < 1:
            raise ValueError(f"num_train_epochs must be >= 1, got {self.num_train_epochs}")
        if self.eval_steps < 0:
            raise ValueError(f"eval_steps must be >= 0, got {self.eval_steps}")


def epoch_batches(
    n: int,
    micro_bs: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    lengths: Optional[Sequence[int]] = None,
    grad_accum: int = 1,
) -> List[List[int]]:
    """This rank's micro-batches (dataset positions) for one epoch.

    The epoch's order is a seeded permutation (or, with ``lengths``, a length-grouped order: batches of similar
    length, in random batch order) wrapped around to fill the last global batch, so every rank runs the same number of
    micro-batches, and a multiple of ``grad_accum`` of them (an epoch ends on an optimizer step, so a checkpoint taken
    there holds no half-accumulated gradient). Global batch g is positions ``[g*G, (g+1)*G)`` of that order
    (G = micro_bs * world_size); rank r takes its r-th slice.
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    global_bs = micro_bs * world_size
    if lengths is None:
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = _length_grouped(lengths, global_bs, g)
    n_global = math.ceil(n / (global_bs * grad_accum)) * grad_accum
    need = n_global * global_bs
    order = (order * math.ceil(need / n))[:need]  # wrap around to fill the last global batches
    return [order[b * global_bs + rank * micro_bs : b * global_bs + (rank + 1) * micro_bs] for b in range(n_global)]


def _length_grouped(lengths: Sequence[int], global_bs: int, g: torch.Generator, mega: int = 32) -> List[int]:
    # Batches of similar length (little padding) from the data layer's grouping, then the whole batches shuffled, so
    # long and short batches alternate at random instead of running long-to-short inside each mega-batch.
    from .data.glue import length_grouped_indices

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    order = length_grouped_indices(lengths, global_bs, seed, mega_batch_mult=mega)
    batches = [order[i : i + global_bs] for i in range(0, len(order), global_bs)]
    tail = batches.pop() if len(batches) > 1 and len(batches[-1]) < global_bs else None
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return [i for b in batches + ([tail] if tail else []) for i in b]


@torch.no_grad()
def predict(model, dataset, collator, batch_size: int, device=None, group=None, progress=False) -> np.ndarray:
    """Predictions (logits, [N, C]) of ``model`` on ``dataset``, split across ranks, every example exactly once.

    Rank r predicts positions r, r + W, ...; every rank runs the same number of forwards (an empty shard's last batch
    re-runs position 0 and is discarded) so ZeRO-3's collective weight gathering stays in step. ``group``: the ranks
    that share the work (None: all). progress: an ``eval`` bar over this rank's batches.
    """
    rank, world_size = world(group)
    n = len(dataset)
    shard = list(range(rank, n, world_size))
    n_batches = math.ceil(math.ceil(n / world_size) / batch_size)
    from .modeling import accepted_inputs, model_inputs

    accepted = accepted_inputs(model)
    was_training = model.training
    model.eval()
    positions, outputs = [], []
    for b in progress_iter(range(n_batches), "eval", show=progress):
        ids = shard[b * batch_size : (b + 1) * batch_size]
        batch = collator([dataset[i] for i in (ids or [0])])
        inputs = {k: v.to(device) if device else v for k, v in model_inputs(batch, accepted).items()}
        logits = model(**inputs).logits.float().cpu()
        if ids:
            positions += ids
            outputs.append(logits)
    model.train(was_training)
    local = (positions, torch.cat(outputs).numpy() if outputs else np.zeros((0, 1), np.float32))
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local, group=group)
    else:
        gathered = [local]
    pos = np.concatenate([np.asarray(p, dtype=np.int64) for p, _ in gathered])
    out = np.concatenate([o for p, o in gathered if len(p)])
    if not (len(pos) == n == len(np.unique(pos))):
        raise RuntimeError(f"evaluation saw {len(pos)} predictions for {n} examples ({len(np.unique(pos))} distinct)")
    preds = np.empty_like(out)
    preds[pos] = out
    return preds


def evaluate(
    model, dev_sets: Mapping[str, object], collator, task, batch_size: int, device=None, group=None, progress=False
) -> Dict[str, float]:
    """Task metrics on every dev split; keys are ``accuracy`` etc., prefixed ``dev_mismatched/`` for extra splits."""
    from .metrics import compute_metrics

    scores = {}
    for i, (split, ds) in enumerate(dev_sets.items()):
        preds = predict(model, ds, collator, batch_size, device, group, progress)
        metrics = compute_metrics(task, preds, np.asarray(ds["label"]))
        scores.update({(k if i == 0 else f"{split}/{k}"): v for k, v in metrics.items()})
    return scores


class Callback:
    """Hooks around the loop's steps; override what you need. ``losses``: the objective's dict of tensors."""

    def on_train_start(self, state: TrainState, total_micro_steps: int) -> None: ...

    def on_micro_step(self, state: TrainState, losses: Dict[str, torch.Tensor]) -> None: ...

    def on_optimizer_step(self, state: TrainState, losses: Dict[str, torch.Tensor]) -> None: ...

    def on_eval(self, state: TrainState, record: dict) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


class Callbacks(Callback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def on_train_start(self, state, total_micro_steps):
        for c in self.callbacks:
            c.on_train_start(state, total_micro_steps)

    def on_micro_step(self, state, losses):
        for c in self.callbacks:
            c.on_micro_step(state, losses)

    def on_optimizer_step(self, state, losses):
        for c in self.callbacks:
            c.on_optimizer_step(state, losses)

    def on_eval(self, state, record):
        for c in self.callbacks:
            c.on_eval(state, record)

    def on_train_end(self, state):
        for c in self.callbacks:
            c.on_train_end(state)


class MonitorLog(Callback):
    """The engine's DeepSpeed monitor (csv / tensorboard / wandb): train losses per optimizer step, eval scores."""

    def __init__(self, engine):
        self.engine = engine

    def on_optimizer_step(self, state, losses):
        _log_scalars(self.engine, {f"train/{k}": v.item() for k, v in losses.items() if "/" not in k})

    def on_eval(self, state, record):
        _log_scalars(self.engine, {f"eval/{k}": v for k, v in record.items() if k not in ("step", "epoch")})


class NonFiniteGuard:
    """Counts micro-batches whose loss is inf/NaN (on any rank: they are skipped on every rank, no backward, no step)
    and stops the run when ``limit`` come in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def skip(self, nonfinite: bool, state: TrainState, losses) -> bool:
        if not nonfinite:
            self.in_a_row = 0
            return False
        state.nonfinite_skipped += 1
        self.in_a_row += 1
        logger.warning("non-finite loss at epoch %d micro-step %d: skipped", state.epoch, state.micro_step_in_epoch)
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"the loss was inf/NaN for {self.in_a_row} micro-batches in a row (last terms: "
                f"{ {k: round(v.item(), 4) for k, v in losses.items() if '/' not in k} }); lower the "
                "learning rate, check the data and the teacher, or use bf16 instead of fp16"
            )
        return True


def train(
    engine,
    teacher: Optional[Teacher],
    train_ds,
    dev_sets: Mapping[str, object],
    collator,
    task,
    cfg: TrainConfig,
    on_best: Optional[Callable[[dict], None]] = None,
    on_eval: Optional[Callable[[dict], None]] = None,
    resume: bool = False,
    group=None,
    callbacks: Sequence[Callback] = (),
    run_config: Optional[dict] = None,
) -> TrainState:
    """Run (or resume) training; returns the final state. ``on_best(record)`` saves the best student.
    ``group``: the ranks the engine trains on (the hosted layout's student group; None: all). ``callbacks``: see
    :class:`Callback`. ``run_config``: stored in every checkpoint."""
    rank, world_size = world(group)
    micro_bs, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    ckpt_dir = os.path.join(cfg.output_dir, CKPT_DIR)
    lengths = example_lengths(train_ds) if cfg.group_by_length else None
    state = load_state(engine, ckpt_dir, group) if resume else TrainState()
    n_micro = len(epoch_batches(len(train_ds), micro_bs, cfg.seed, 0, rank, world_size, grad_accum=gas))
    t_start = time.perf_counter() - state.train_seconds
    hooks = Callbacks([MonitorLog(engine), *callbacks])
    if cfg.progress and rank == 0:
        initial = state.epoch * n_micro + state.micro_step_in_epoch
        hooks.callbacks.append(ProgressBar(cfg.label, cfg.log_steps, t_start, initial))
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)

    def evaluate_and_save():
        state.train_seconds = time.perf_counter() - t_start
        record = _evaluate(
            engine, state, dev_sets, collator, task, micro_bs, group, on_best, cfg.progress and rank == 0
        )
        hooks.on_eval(state, record)
        if on_eval:
            on_eval(record)
        save_state(engine, ckpt_dir, state, group, run_config)

    hooks.on_train_start(state, cfg.num_train_epochs * n_micro)
    with _StopSignals() as stop:
        while state.epoch < cfg.num_train_epochs:
            batches = epoch_batches(len(train_ds), micro_bs, cfg.seed, state.epoch, rank, world_size, lengths, gas)
            todo = batches[state.micro_step_in_epoch :]
            for batch, t_out, waited in _batches(todo, train_ds, collator, teacher, engine, cfg.stream_teacher):
                losses = engine(batch, t_out)
                nonfinite, stop_now = _sync_flags(losses["loss"], stop.requested, group)
                if not guard.skip(nonfinite, state, losses):
                    engine.backward(losses["loss"])
                    engine.step()
                stepped = _advance(state, engine, batch, world_size, waited)
                hooks.on_micro_step(state, losses)
                if stepped:
                    hooks.on_optimizer_step(state, losses)
                    if cfg.eval_steps and state.global_step % cfg.eval_steps == 0:
                        evaluate_and_save()
                    elif stop_now:
                        state.train_seconds = time.perf_counter() - t_start
                        save_state(engine, ckpt_dir, state, group, run_config)
                    if stop_now:
                        raise TrainingInterrupted(stop_now, ckpt_dir)
            state.epoch, state.micro_step_in_epoch = state.epoch + 1, 0
            if not cfg.eval_steps or state.global_step % cfg.eval_steps:
                evaluate_and_save()
            else:
                state.train_seconds = time.perf_counter() - t_start
                save_state(engine, ckpt_dir, state, group, run_config)
    hooks.on_train_end(state)
    return state


def _advance(state: TrainState, engine, batch, world_size: int, waited: float) -> bool:
    """Count one micro-step into the state; True when it ended an optimizer step."""
    state.micro_step_in_epoch += 1
    state.samples += batch["input_ids"].shape[0] * world_size
    state.teacher_wait_seconds += waited
    stepped = engine.global_steps != state.global_step
    state.global_step = engine.global_steps
    return stepped


def _evaluate(engine, state, dev_sets, collator, task, batch_size, group, on_best, progress=False) -> dict:
    """Score the student on the dev sets, record it in the history, keep (and save) the best."""
    from .metrics import main_metric_value

    student = engine.module.student
    device = next(student.parameters()).device
    scores = evaluate(student, dev_sets, collator, task, batch_size, device, group, progress)
    record = {"step": engine.global_steps, "epoch": state.epoch, **scores}
    state.history.append(record)
    value = main_metric_value(task, scores)
    if state.best_metric is None or value > state.best_metric:
        state.best_metric, state.best_step, state.best_scores = value, engine.global_steps, scores
        if on_best:
            on_best(record)
    return record


def _batches(todo, train_ds, collator, teacher, engine, stream: bool):
    """(batch, teacher output, seconds the student waited for it) for each micro-batch, in order."""
    device = next(engine.module.student.parameters()).device
    device = device if device.type != "cpu" else None
    batches = (collator([train_ds[i] for i in ids]) for ids in todo)
    if teacher is None:
        for batch in batches:
            yield (_to(batch, device) if device else batch), None, 0.0
        return
    from .teachers.stream import StreamingTeacher

    streamed = StreamingTeacher(teacher, batches, device=device, inline=None if stream else True)
    last = 0.0
    for batch, t_out in streamed:
        yield batch, t_out, streamed.wait_seconds - last
        last = streamed.wait_seconds


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _log_scalars(engine, values: Dict[str, float]) -> None:
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and getattr(monitor, "enabled", False):
        monitor.write_events([(k, float(v), engine.global_samples) for k, v in values.items()])
