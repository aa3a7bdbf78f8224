"""One factory for every teacher kind: what the objective needs, where the teacher runs, and the model.

    needs = objective.teacher_needs()                       # TeacherNeeds(hidden_layers=(0, 2, 4), attentions=True)
    placement = TeacherPlacement(tp_size=2, dtype="bf16")   # or cache_dir=..., or layout=split_ranks((0, 1))
    teacher = build_teacher(teacher_model, needs, placement, task_num_labels=2)

Local (one rank's own copy), tensor-parallel (DeepSpeed inference, ``tp_size > 1``), a cache of precomputed outputs
(``cache_dir``, built on first use from ``cache_data``), or hosted on other ranks (``layout``; the teacher ranks call
:func:`serve_hosted_teacher`). The tensor-parallel teacher is built in exactly one place, :func:`live_teacher`.
"""

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

import torch

from ..config import ConfigError
from .base import Teacher

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TeacherNeeds:
    """What an objective needs from its teacher: logits always; the hidden-state indices its layer map compares
    (None: no hidden states); attention maps or not."""

    hidden_layers: Optional[Tuple[int, ...]] = None
    attentions: bool = False

    @property
    def hidden_states(self) -> bool:
        return self.hidden_layers is not None


@dataclass(frozen=True)
class TeacherPlacement:
    """Where and how the teacher runs. tp_size: tensor-parallel degree (1: a local model); dtype: fp32 | bf16 | fp16;
    cache_dir: precomputed outputs; layout: the hosted layout (:func:`ad2_ds.dist.split_ranks`)."""

    tp_size: int = 1
    dtype: str = "fp32"
    cache_dir: Optional[str] = None
    layout: Any = None


@dataclass(frozen=True)
class CacheData:
    """What a cache is built from and keyed by: the tokenized training set, its collator, and the fingerprint parts."""

    dataset: Any
    collator: Any
    parts: Mapping[str, Any]


def live_teacher(model, needs: TeacherNeeds, dtype: str = "fp32", tp_size: int = 1, group=None) -> Teacher:
    """The model run in this process: tensor-parallel over ``tp_size`` ranks (or over ``group``), else local."""
    from .ds_inference import DeepSpeedTeacher
    from .local import LocalTeacher

    kinds = dict(output_hidden_states=needs.hidden_states, output_attentions=needs.attentions)
    if tp_size > 1 or group is not None:
        tp = dict(group=group) if group is not None else dict(tp_size=tp_size)
        return DeepSpeedTeacher(model, dtype=DTYPES[dtype], **tp, **kinds)
    return LocalTeacher(model, dtype=DTYPES[dtype], **kinds)


def build_teacher(
    model,
    needs: TeacherNeeds,
    placement: TeacherPlacement,
    num_labels: Optional[int] = None,
    cache_data: Optional[CacheData] = None,
) -> Teacher:
    """The teacher a student rank calls, behind the one interface (see the module docstring)."""
    if placement.layout is not None:
        from .hosted import connect_hosted_teacher

        return connect_hosted_teacher(placement.layout, needs.hidden_layers, num_labels, needs.attentions)
    live = live_teacher(model, needs, placement.dtype, placement.tp_size)
    if not placement.cache_dir:
        return live
    return open_or_build_cache(live, needs, placement, cache_data)


def open_or_build_cache(live: Teacher, needs: TeacherNeeds, placement: TeacherPlacement, data: CacheData) -> Teacher:
    """Reuse a cache whose fingerprint matches (no teacher pass); build it when there is none; never silently
    rebuild a stale one."""
    from .cache import CachedTeacher, build_cache_for_dataset

    cache_dir, need = placement.cache_dir, needs.hidden_layers or ()
    if os.path.isfile(os.path.join(cache_dir, "meta.json")):
        try:
            return CachedTeacher(cache_dir, data.parts, require_hidden_layers=need)
        except ValueError as e:  # stale, or built without the layers this run needs
            raise ConfigError("teacher_cache", f"{cache_dir}: {e}; pass another directory or delete it") from None
    build_cache_for_dataset(
        live,
        data.dataset,
        data.collator,
        cache_dir,
        data.parts,
        hidden_layers=need,
        dtype=torch.bfloat16 if placement.dtype == "bf16" else torch.float16,
    )
    return CachedTeacher(cache_dir, data.parts, require_hidden_layers=need)


def serve_hosted_teacher(model, needs: TeacherNeeds, placement: TeacherPlacement) -> dict:
    """A teacher rank of the hosted layout: the teacher, tensor-parallel over all teacher ranks when several, serves
    until every student closed; returns the serving stats."""
    from .hosted import serve_hosted

    layout = placement.layout
    group = layout.teacher_group if len(layout.teacher_ranks) > 1 else None
    return serve_hosted(live_teacher(model, needs, placement.dtype, group=group), layout)
