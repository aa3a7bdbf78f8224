"""The user's DeepSpeed JSON, checked before any expensive work and resolved for this run.

    ds_config = load_ds_config("ds_configs/zero2.json")               # dict; clear ValueError when wrong
    ds_config = resolve_scheduler_steps(ds_config, total_optimizer_steps=375)

    ds_config, note = single_rank_config(ds_config, data_parallel_size=1)  # ZeRO-1/2 -> 0 on one rank
    engine, *_ = deepspeed.initialize(model=objective, config=ds_config, ...)
    skip_single_rank_allreduce(engine)                                 # nothing to all-reduce on one rank

The JSON alone owns batch size, accumulation, precision, optimizer, scheduler, clipping and ZeRO stage; the code
reads them back from the engine. The only values resolved here are the scheduler's step counts, given as "auto"
in the shipped configs because they depend on the data size and epochs (raw DeepSpeed resolves no "auto").
The one exception is opt-in (the recipes take it unless ``--keep_zero_stage``): with a single data-parallel rank,
ZeRO stages 1 and 2 have nothing to partition across, but DeepSpeed still copies every gradient into its buckets and
every updated fp32 partition back into the model, each step (10% of a KD step on one CPU rank, docs/RESULTS.md);
:func:`single_rank_config` runs such a config at stage 0, and :func:`skip_single_rank_allreduce` drops stage 0's
all-reduce over a world of one (a flatten, a no-op reduce and a copy back of every gradient).
"""

import copy
import json
import os
from typing import Optional, Tuple

import torch

from .patches import skip_single_rank_allreduce  # noqa: F401  (re-exported: its home was here)


def load_ds_config(path: str, world_size: int = 1, on_gpu: Optional[bool] = None) -> dict:
    if not path:
        raise ValueError("no DeepSpeed config: pass --deepspeed ds_configs/zero2.json")
    if not os.path.isfile(path):
        raise ValueError(f"DeepSpeed config {path!r} does not exist: pass e.g. --deepspeed ds_configs/zero2.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"DeepSpeed config {path} must be a JSON object")
    check_ds_config(cfg, path, world_size, torch.cuda.is_available() if on_gpu is None else on_gpu)
    return cfg


def check_ds_config(cfg: dict, name: str, world_size: int, on_gpu: bool) -> None:
    """One clear ValueError for the mistakes that otherwise fail deep inside DeepSpeed, or much later."""
    fp16 = cfg.get("fp16", {}).get("enabled", False)
    bf16 = cfg.get("bf16", {}).get("enabled", False) or cfg.get("bfloat16", {}).get("enabled", False)
    if fp16 and not on_gpu:
        raise ValueError(
            f"{name} enables fp16, which this machine's CPU cannot run: use bf16 (ds_configs/zero2_bf16.json)"
        )
    if fp16 and bf16:
        raise ValueError(f"{name} enables both fp16 and bf16: pick one")
    micro = cfg.get("train_micro_batch_size_per_gpu")
    gas = cfg.get("gradient_accumulation_steps", 1)
    total = cfg.get("train_batch_size")
    for key, value in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", gas),
        ("train_batch_size", total),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(
                f"{name}: {key} must be a positive integer, got {value!r} (raw DeepSpeed resolves no 'auto')"
            )
    if micro is None and total is None:
        raise ValueError(f"{name} sets neither train_micro_batch_size_per_gpu nor train_batch_size")
    if micro is not None and total is not None and total != micro * gas * world_size:
        raise ValueError(
            f"{name}: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {gas} x {world_size} ranks; drop train_batch_size or fix it"
        )
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{name}: zero_optimization.stage must be 0-3, got {stage!r}")


def resolve_scheduler_steps(cfg: dict, total_optimizer_steps: int, warmup_fraction: float = 0.06) -> dict:
    """A copy with the scheduler's "auto" step counts set for this run (warm-up: 6% of the steps, as BERT's)."""
    cfg = copy.deepcopy(cfg)
    params = cfg.get("scheduler", {}).get("params", {})
    if params.get("total_num_steps") == "auto":
        params["total_num_steps"] = max(1, int(total_optimizer_steps))
    if params.get("warmup_num_steps") == "auto":
        params["warmup_num_steps"] = max(1, int(warmup_fraction * total_optimizer_steps))
    for key, value in params.items():
        if value == "auto":
            raise ValueError(f"scheduler.params.{key} is 'auto'; only total_num_steps and warmup_num_steps can be")
    return cfg


def single_rank_config(cfg: dict, data_parallel_size: int) -> Tuple[dict, Optional[str]]:
    """``(config, note)``: with one data-parallel rank, a ZeRO stage 1 or 2 config becomes stage 0 (``note`` says so);
    anything else (several ranks, stage 0 or 3, optimizer offload, which still moves state off the accelerator) is
    returned unchanged with ``note`` None. The optimizer's arithmetic is the same at every stage."""
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if data_parallel_size != 1 or stage not in (1, 2) or offload:
        return cfg, None
    cfg = copy.deepcopy(cfg)
    cfg["zero_optimization"] = {"stage": 0}
    return cfg, (
        f"one data-parallel rank: ZeRO stage {stage} would partition nothing and only copy gradients and weights "
        "each step; running stage 0 (--keep_zero_stage keeps the config's stage)"
    )
