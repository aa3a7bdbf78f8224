"""Checkpoints of a training run: DeepSpeed's own files plus the loop's state, every rank's RNG and the run's config.

    save_state(engine, "runs/x/checkpoints", state, group, run_config=config.to_dict())   # + ascent free's δ store
    state = load_state(engine, "runs/x/checkpoints", group)      # weights_only unpickling; RNG states restored

``latest`` is replaced atomically once every rank has written its files, so a kill at any moment leaves a complete
checkpoint that loads. The data position (epoch, micro-step) lives in the state: a resumed run skips exactly the
micro-batches it already consumed and continues bit for bit.
"""

import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .ascent import load_store, save_store
from .dist import get_rank, get_world_size
from .patches import default_group, load_weights_only

logger = logging.getLogger(__name__)


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
    schedule: Optional[dict] = None  # the radius schedule's state (ad2_ds.schedule), when it is not constant
    rng: Optional[List[dict]] = None  # one RNG state per rank


def world(group=None) -> tuple:
    """(rank, world size) in ``group`` (None: the whole world); the hosted layout passes its student group."""
    return get_rank(group), get_world_size(group)


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


def save_state(engine, ckpt_dir: str, state: TrainState, group=None, run_config: Optional[dict] = None) -> None:
    """A DeepSpeed checkpoint plus our state (as JSON). ``latest`` is replaced atomically once every rank has written
    its files, so a kill at any moment leaves a complete checkpoint that loads; older ones are removed after that.
    ``group``: the ranks the engine trains on; DeepSpeed's world barriers then run on it (see dist.default_group)."""
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
        client = {"ad2_state": json.dumps(dataclasses.asdict(state)), "run_config": json.dumps(run_config)}
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client, save_latest=False)
    save_store(getattr(engine.module, "delta_store", None), os.path.join(ckpt_dir, tag))  # ascent free's δ per example
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


def check_resumable(ckpt_dir: str) -> None:
    """The one check that a run can resume: a complete checkpoint (its ``latest``) exists under ``ckpt_dir``."""
    if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
        raise ValueError(f"resume: no checkpoint under {ckpt_dir}; start without resuming")


def load_state(engine, ckpt_dir: str, group=None) -> TrainState:
    import pickle

    check_resumable(ckpt_dir)
    load_weights_only(engine)
    try:
        with default_group(group, engine):
            path, client = engine.load_checkpoint(ckpt_dir)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:200]
        raise ValueError(f"--resume: refused to unpickle {ckpt_dir} with weights_only=True ({first})") from None
    if path is None or "ad2_state" not in (client or {}):
        raise ValueError(f"--resume: the checkpoint under {ckpt_dir} could not be loaded")
    state = TrainState(**json.loads(client["ad2_state"]))
    with open(os.path.join(ckpt_dir, "latest")) as f:
        load_store(getattr(engine.module, "delta_store", None), os.path.join(ckpt_dir, f.read().strip()))
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
