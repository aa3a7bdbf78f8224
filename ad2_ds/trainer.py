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

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .data.glue import example_lengths
from .teachers.base import Teacher

logger = logging.getLogger(__name__)
CKPT_DIR = "checkpoints"
# Fault injection for the fault tests: "kill@7" / "term@5" sends this process SIGKILL / SIGTERM after that many
# micro-steps of this run; "kill@3:1" does it on global rank 1 only.
FAULT_ENV = "AD2_FAULT"


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


def _inject_fault(steps_this_run: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if "@" in spec:
        kind, _, at = spec.partition("@")
        at, _, only_rank = at.partition(":")
        if only_rank and int(only_rank) != world()[0]:
            return
        if steps_this_run == int(at):
            import signal

            os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM}[kind])


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
    max_nonfinite_steps: int = 10  # consecutive inf/NaN micro-batches (skipped) before the run stops

    def __post_init__(self):
        if self.num_train_epochs < 1:
            raise ValueError(f"num_train_epochs must be >= 1, got {self.num_train_epochs}")
        if self.eval_steps < 0:
            raise ValueError(f"eval_steps must be >= 0, got {self.eval_steps}")


@dataclass
class TrainState:
    """Everything a resumed run needs besides the engine's own checkpoint."""

    epoch: int = 0
    micro_step_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    global_step: int = 0
    best_metric: Optional[float] = None
    best_step: int = -1
    best_scores: Dict[str, float] = field(default_factory=dict)
    history: List[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    samples: int = 0
    teacher_wait_seconds: float = 0.0
    nonfinite_skipped: int = 0
    rng: Optional[List[dict]] = None  # one RNG state per rank


def world(group=None) -> tuple:
    """(rank, world size) in ``group`` (None: the whole world); the hosted layout passes its student group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


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


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state().tolist(),
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
    }


def _jsonable(x):
    if isinstance(x, tuple) or isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))


@torch.no_grad()
def predict(model, dataset, collator, batch_size: int, device=None, group=None) -> np.ndarray:
    """Predictions (logits, [N, C]) of ``model`` on ``dataset``, split across ranks, every example exactly once.

    Rank r predicts positions r, r + W, ...; every rank runs the same number of forwards (an empty shard's last batch
    re-runs position 0 and is discarded) so ZeRO-3's collective weight gathering stays in step. ``group``: the ranks
    that share the work (None: all).
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
    for b in range(n_batches):
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
    model, dev_sets: Mapping[str, object], collator, task, batch_size: int, device=None, group=None
) -> Dict[str, float]:
    """Task metrics on every dev split; keys are ``accuracy`` etc., prefixed ``dev_mismatched/`` for extra splits."""
    from .metrics import compute_metrics

    scores = {}
    for i, (split, ds) in enumerate(dev_sets.items()):
        preds = predict(model, ds, collator, batch_size, device, group)
        metrics = compute_metrics(task, preds, np.asarray(ds["label"]))
        scores.update({(k if i == 0 else f"{split}/{k}"): v for k, v in metrics.items()})
    return scores


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
) -> TrainState:
    """Run (or resume) training; returns the final state. ``on_best(record)`` saves the best student.
    ``group``: the ranks the engine trains on (the hosted layout's student group; None: all)."""
    rank, world_size = world(group)
    objective = engine.module
    student = objective.student
    device = next(student.parameters()).device
    micro_bs = engine.train_micro_batch_size_per_gpu()
    gas = engine.gradient_accumulation_steps()
    ckpt_dir = os.path.join(cfg.output_dir, CKPT_DIR)
    lengths = example_lengths(train_ds) if cfg.group_by_length else None
    n_micro = len(epoch_batches(len(train_ds), micro_bs, cfg.seed, 0, rank, world_size, grad_accum=gas))
    state = TrainState()
    if resume:
        state = load_state(engine, ckpt_dir, group)
    from .metrics import main_metric_value

    def run_eval():
        scores = evaluate(student, dev_sets, collator, task, micro_bs, device, group)
        record = {"step": engine.global_steps, "epoch": state.epoch, **scores}
        state.history.append(record)
        value = main_metric_value(task, scores)
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step, state.best_scores = value, engine.global_steps, scores
            if on_best:
                on_best(record)
        if on_eval:
            on_eval(record)
        _log_scalars(engine, {f"eval/{k}": v for k, v in scores.items()})
        return record

    bar = _progress(
        cfg, rank, total=cfg.num_train_epochs * n_micro, initial=state.epoch * n_micro + state.micro_step_in_epoch
    )
    t_start = time.perf_counter() - state.train_seconds
    steps_this_run = consecutive_nonfinite = 0
    with _StopSignals() as stop:
        while state.epoch < cfg.num_train_epochs:
            batches = epoch_batches(len(train_ds), micro_bs, cfg.seed, state.epoch, rank, world_size, lengths, gas)
            todo = batches[state.micro_step_in_epoch :]
            for batch, t_out, waited in _batches(todo, train_ds, collator, teacher, device, cfg.stream_teacher):
                state.teacher_wait_seconds += waited
                losses = engine(batch, t_out)
                nonfinite, stop_now = _sync_flags(losses["loss"], stop.requested, group)
                if nonfinite:
                    # Skip it on every rank (no backward, no step), rather than train on garbage.
                    state.nonfinite_skipped += 1
                    consecutive_nonfinite += 1
                    logger.warning(
                        "non-finite loss at epoch %d micro-step %d: skipped", state.epoch, state.micro_step_in_epoch
                    )
                    if consecutive_nonfinite >= cfg.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"the loss was inf/NaN for {consecutive_nonfinite} micro-batches in a row (last terms: "
                            f"{ {k: round(v.item(), 4) for k, v in losses.items() if '/' not in k} }); lower the "
                            "learning rate, check the data and the teacher, or use bf16 instead of fp16"
                        )
                else:
                    consecutive_nonfinite = 0
                    engine.backward(losses["loss"])
                    engine.step()
                state.micro_step_in_epoch += 1
                steps_this_run += 1
                _inject_fault(steps_this_run)
                state.samples += batch["input_ids"].shape[0] * world_size
                boundary = engine.global_steps != state.global_step
                state.global_step = engine.global_steps
                if bar is not None:
                    bar.update(1)
                    if state.micro_step_in_epoch % cfg.log_steps == 0:
                        elapsed = time.perf_counter() - t_start
                        bar.set_postfix(
                            {k: f"{v.item():.4f}" for k, v in losses.items() if "/" not in k}
                            | {"samples/s": f"{state.samples / max(elapsed, 1e-9):.1f}"}
                        )
                if boundary:
                    _log_scalars(engine, {f"train/{k}": v.item() for k, v in losses.items() if "/" not in k})
                    if cfg.eval_steps and state.global_step % cfg.eval_steps == 0:
                        state.train_seconds = time.perf_counter() - t_start
                        run_eval()
                        save_state(engine, ckpt_dir, state, group)
                    elif stop_now:
                        state.train_seconds = time.perf_counter() - t_start
                        save_state(engine, ckpt_dir, state, group)
                    if stop_now:
                        raise TrainingInterrupted(stop_now, ckpt_dir)
            state.epoch += 1
            state.micro_step_in_epoch = 0
            state.train_seconds = time.perf_counter() - t_start
            if not cfg.eval_steps or state.global_step % cfg.eval_steps:
                run_eval()
            save_state(engine, ckpt_dir, state, group)
    if bar is not None:
        bar.close()
    return state


def _batches(todo, train_ds, collator, teacher, device, stream: bool):
    """(batch, teacher output, seconds the student waited for it) for each micro-batch, in order."""
    device = device if device is not None and device.type != "cpu" else None
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


def _progress(cfg, rank, total, initial):
    if not cfg.progress or rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="distill", unit="batch", dynamic_ncols=True)


def _log_scalars(engine, values: Dict[str, float]) -> None:
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and getattr(monitor, "enabled", False):
        monitor.write_events([(k, float(v), engine.global_samples) for k, v in values.items()])


def save_state(engine, ckpt_dir: str, state: TrainState, group=None) -> None:
    """A DeepSpeed checkpoint plus our state (as JSON). ``latest`` is replaced atomically once every rank has written
    its files, so a kill at any moment leaves a complete checkpoint that loads; older ones are removed after that.
    ``group``: the ranks the engine trains on; DeepSpeed's world barriers then run on it (see dist.default_group)."""
    from .dist import default_group

    # DeepSpeed stores the client state from one rank only: keep every rank's RNG state (dropout differs per rank).
    rank, world_size = world(group)
    rngs = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rngs, _rng_state(), group=group)
    else:
        rngs = [_rng_state()]
    state.rng = rngs
    tag = f"global_step{engine.global_steps}"
    with default_group(group, engine):
        engine.save_checkpoint(
            ckpt_dir, tag=tag, client_state={"ad2_state": json.dumps(dataclasses.asdict(state))}, save_latest=False
        )
    if world_size > 1:
        dist.barrier(group)
    if rank == 0:
        tmp = os.path.join(ckpt_dir, ".latest.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(ckpt_dir, "latest"))
        for name in os.listdir(ckpt_dir):
            path = os.path.join(ckpt_dir, name)
            if name.startswith("global_step") and name != tag and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)


def _safe_globals() -> list:
    """DeepSpeed's plain-data classes that its checkpoints hold (seen: ZeRO 0-3, bf16, offload), nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(engine) -> None:
    """Make the engine unpickle its checkpoint files with ``weights_only=True`` (DeepSpeed's own loader does not), so
    resuming from a checkpoint cannot run code hidden in it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine:
        return  # another checkpoint engine (e.g. Nebula): left as configured

    def load(path, map_location=None):
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load


def load_state(engine, ckpt_dir: str, group=None) -> TrainState:
    import pickle

    from .dist import default_group

    if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
        raise ValueError(f"--resume: no checkpoint under {ckpt_dir}; start without --resume")
    _load_weights_only(engine)
    try:
        with default_group(group, engine):
            path, client = engine.load_checkpoint(ckpt_dir)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:200]
        raise ValueError(f"--resume: refused to unpickle {ckpt_dir} with weights_only=True ({first})") from None
    if path is None or "ad2_state" not in (client or {}):
        raise ValueError(f"--resume: the checkpoint under {ckpt_dir} could not be loaded")
    state = TrainState(**json.loads(client["ad2_state"]))
    rank, world_size = world(group)
    if len(state.rng) != world_size:
        raise ValueError(
            f"--resume: the checkpoint was written by {len(state.rng)} ranks, this run has {world_size}; resume with "
            f"the same number of ranks (the data order and each rank's random state depend on it)"
        )
    _set_rng_state(state.rng[rank])
    logger.info(
        "resumed from %s: epoch %d, micro-step %d, global step %d",
        path,
        state.epoch,
        state.micro_step_in_epoch,
        state.global_step,
    )
    return state
