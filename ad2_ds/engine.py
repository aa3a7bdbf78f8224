"""One call from an objective and a DeepSpeed JSON to a training engine.

    engine, ds_config = build_engine(objective, "ds_configs/zero2.json", train_size=len(train_ds), num_epochs=3)

It does, in this order, what every caller did by hand: load and check the JSON, size the scheduler's "auto" step
counts from the data (the trainer's own batching decides how many micro-batches an epoch has), run a one-rank ZeRO-1/2
config at stage 0 (unless ``keep_zero_stage``), ``deepspeed.initialize`` (on the hosted layout's student group when
given one), and drop stage 0's all-reduce over a world of one. ``ds_config`` is the resolved JSON, for results files.
"""

import logging
import weakref
from typing import Optional, Tuple, Union

from . import dist
from .dsconfig import check_ds_config, load_ds_config, resolve_scheduler_steps, single_rank_config

logger = logging.getLogger(__name__)


def steps_per_epoch(ds_config: dict, train_size: int, data_parallel_size: int) -> int:
    """Optimizer steps in one epoch of ``train_size`` examples, as :func:`ad2_ds.trainer.epoch_batches` batches it."""
    from .trainer import epoch_batches

    micro = ds_config.get("train_micro_batch_size_per_gpu") or ds_config["train_batch_size"] // data_parallel_size
    gas = ds_config.get("gradient_accumulation_steps", 1)
    n_micro = len(epoch_batches(train_size, micro, 0, 0, 0, data_parallel_size, grad_accum=gas))
    return n_micro // gas


def build_engine(
    objective,
    ds_config: Union[str, dict],
    train_size: Optional[int] = None,
    num_epochs: int = 1,
    layout=None,
    keep_zero_stage: bool = False,
    optimizer=None,
    single_rank_path: bool = True,
) -> Tuple[object, dict]:
    """``(engine, resolved ds_config)`` for ``objective`` (any ``nn.Module``; usually an AD2Objective).

    ds_config: a path or the JSON as a dict. train_size / num_epochs: size the scheduler's "auto" step counts (without
    them an "auto" count is an error). layout: the hosted layout (:func:`ad2_ds.dist.split_ranks`): the engine trains
    on its student group. optimizer: a torch optimizer instead of the JSON's (needs ``zero_allow_untested_optimizer``
    under ZeRO). single_rank_path: False builds exactly the JSON's engine, even on one rank (for measuring it).
    """
    import deepspeed

    group = layout.student_group if layout is not None else None
    world_size = dist.get_world_size(group)
    if isinstance(ds_config, str):
        ds_config = load_ds_config(ds_config, world_size)
    else:
        check_ds_config(ds_config, "the DeepSpeed config", world_size, _on_gpu())
    if train_size is not None:
        ds_config = resolve_scheduler_steps(ds_config, num_epochs * steps_per_epoch(ds_config, train_size, world_size))
    if single_rank_path and not keep_zero_stage:
        ds_config, note = single_rank_config(ds_config, world_size)
        if note and dist.get_rank(group) == 0:
            print(note, flush=True)
    mpu = None
    if layout is not None:
        from .dist import StudentGroupMPU

        mpu = StudentGroupMPU.from_layout(layout)
    params = None if optimizer is not None else [p for p in objective.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=objective, model_parameters=params, optimizer=optimizer, config=ds_config, mpu=mpu
    )
    # ascent clean_grad takes its clean gradients at the engine's fp16 loss scale (a weakref: the engine holds it)
    objective.__dict__["_scaling_engine"] = weakref.ref(engine)
    if single_rank_path:
        from .patches import skip_single_rank_allreduce

        skip_single_rank_allreduce(engine)
    return engine, ds_config


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
