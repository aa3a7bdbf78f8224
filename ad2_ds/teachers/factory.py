"""One factory for every teacher kind: what the objective needs, where the teacher runs, and the model.

    needs = objective.teacher_needs()                       # TeacherNeeds(hidden_layers=(0, 2, 4), attentions=True)
    placement = TeacherPlacement(tp_size=2, dtype="bf16")   # or cache_dir=..., or layout=split_ranks((0, 1))
    teacher = build_teacher(teacher_model, needs, placement, task_num_labels=2)

Local (one rank's own copy), tensor-parallel (DeepSpeed inference, ``tp_size > 1``), a cache of precomputed outputs
(``cache_dir``, built on first use from ``cache_data``), or hosted on other ranks (``layout``; the teacher ranks call
:func:`serve_hosted_teacher`). The tensor-parallel teacher is built in exactly one place, :func:`live_teacher`.

Given a :class:`TeacherSource` (the teacher's checkpoint folder), a tensor-parallel teacher (``tp_size > 1``, or the
hosted layout's teacher ranks when several) is loaded with
:meth:`~ad2_ds.teachers.ds_inference.DeepSpeedTeacher.from_pretrained`: each rank reads only its own shards from the
safetensors files, and no rank builds the whole model first (``model`` may then be None). At tp_size 1 the model is
run as given.
"""

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

import torch

from ..config import ConfigError
from .base import Teacher

logger = logging.getLogger(__name__)
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
class TeacherSource:
    """Where a tensor-parallel teacher is loaded from, shard by shard: its checkpoint folder (safetensors) and the
    settings of its ``from_pretrained``. label_order: see :class:`~ad2_ds.teachers.ds_inference.DeepSpeedTeacher`.
    pad_token_id: a decoder teacher's pad id (its tokenizer's, after
    :func:`~ad2_ds.teachers.decoder.prepare_decoder_teacher`), written into its config when that has none."""

    path: str
    num_labels: Optional[int] = None
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False
    pad_token_id: Optional[int] = None
    label_order: Optional[Tuple[int, ...]] = None  # teacher outputs in the data's label order (own data, remapped)


@dataclass(frozen=True)
class CacheData:
    """What a cache is built from and keyed by: the tokenized training set, its collator, and the fingerprint parts."""

    dataset: Any
    collator: Any
    parts: Mapping[str, Any]
    rebuild: bool = False  # build it anew even when a cache is there (stale, damaged or valid)
    progress: bool = False  # a "teacher cache" bar on rank 0 while it is built


def live_teacher(
    model,
    needs: TeacherNeeds,
    dtype: str = "fp32",
    tp_size: int = 1,
    group=None,
    source: Optional[TeacherSource] = None,
) -> Teacher:
    """The model run in this process: tensor-parallel over ``tp_size`` ranks (or over ``group``), else local. With a
    ``source``, a tensor-parallel teacher is loaded from its checkpoint shard by shard (``model`` is not used and may
    be None)."""
    from .ds_inference import DeepSpeedTeacher
    from .local import LocalTeacher

    kinds = dict(output_hidden_states=needs.hidden_states, output_attentions=needs.attentions)
    if tp_size > 1 or group is not None:
        tp = dict(group=group) if group is not None else dict(tp_size=tp_size)
        if source is not None:
            logger.info("teacher: %s loaded shard by shard (DeepSpeedTeacher.from_pretrained)", source.path)
            return DeepSpeedTeacher.from_pretrained(
                source.path,
                dtype=DTYPES[dtype],
                num_labels=source.num_labels,
                attn_implementation=source.attn_implementation,
                trust_remote_code=source.trust_remote_code,
                pad_token_id=source.pad_token_id,
                label_order=source.label_order,
                **tp,
                **kinds,
            )
        if model is None:
            raise ValueError("live_teacher: a tensor-parallel teacher needs a model or a TeacherSource to load from")
        return DeepSpeedTeacher(model, dtype=DTYPES[dtype], **tp, **kinds)
    if model is None:
        raise ValueError("live_teacher: at tp_size 1 the teacher is run as given, so it needs the model")
    return LocalTeacher(model, dtype=DTYPES[dtype], **kinds)


def build_teacher(
    model,
    needs: TeacherNeeds,
    placement: TeacherPlacement,
    num_labels: Optional[int] = None,
    cache_data: Optional[CacheData] = None,
    source: Optional[TeacherSource] = None,
    live: Optional[Teacher] = None,
) -> Teacher:
    """The teacher a student rank calls, behind the one interface (see the module docstring). source: load a
    tensor-parallel teacher shard by shard (:func:`live_teacher`); live: a live teacher already built (by
    :func:`live_teacher`), used instead of building another."""
    if placement.layout is not None:
        from .hosted import connect_hosted_teacher

        return connect_hosted_teacher(placement.layout, needs.hidden_layers, num_labels, needs.attentions)
    if live is None:
        live = live_teacher(model, needs, placement.dtype, placement.tp_size, source=source)
    if not placement.cache_dir:
        return live
    return open_or_build_cache(live, needs, placement, cache_data)


def open_or_build_cache(live: Teacher, needs: TeacherNeeds, placement: TeacherPlacement, data: CacheData) -> Teacher:
    """Reuse a cache whose fingerprint matches (no teacher pass; every row's crc32 checked first); build it when there
    is none, or anew with ``data.rebuild``; never silently rebuild a stale or damaged one: the error says how."""
    from .cache import CachedTeacher, build_cache_for_dataset, build_lock

    cache_dir, need = placement.cache_dir, needs.hidden_layers or ()
    remedy = cache_remedy(cache_dir)
    with build_lock(cache_dir):  # a run building it: wait, then reuse (checked under the lock: never a stale rebuild)
        if not data.rebuild and os.path.isfile(os.path.join(cache_dir, "meta.json")):
            try:
                return CachedTeacher(cache_dir, data.parts, require_hidden_layers=need, verify=True, remedy=remedy)
            except ValueError as e:  # stale, damaged, or built without the layers this run needs
                raise ConfigError("teacher_cache", str(e).removeprefix("CachedTeacher: ")) from None
        build_cache_for_dataset(
            live,
            data.dataset,
            data.collator,
            cache_dir,
            data.parts,
            hidden_layers=need,
            dtype=torch.bfloat16 if placement.dtype == "bf16" else torch.float16,
            overwrite=data.rebuild,
            progress=data.progress,
        )
    return CachedTeacher(cache_dir, data.parts, require_hidden_layers=need, remedy=remedy)


def cache_remedy(cache_dir) -> str:
    """The command line's way out of a stale or damaged cache, for its one error line."""
    return f"rerun with --rebuild_teacher_cache to build it anew, or delete {cache_dir}"


def serve_hosted_teacher(
    model, needs: TeacherNeeds, placement: TeacherPlacement, source: Optional[TeacherSource] = None
) -> dict:
    """A teacher rank of the hosted layout: the teacher, tensor-parallel over all teacher ranks when several (loaded
    shard by shard from ``source`` when given), serves until every student closed; returns the serving stats."""
    from .hosted import serve_hosted

    layout = placement.layout
    group = layout.teacher_group if len(layout.teacher_ranks) > 1 else None
    return serve_hosted(live_teacher(model, needs, placement.dtype, group=group, source=source), layout)


class TeacherModel(torch.nn.Module):
    """A live teacher seen as a classifier (``model(**inputs).logits``), so a tensor-parallel teacher that was never
    built whole can be evaluated like a model (:func:`ad2_ds.trainer.evaluate`, ``measure_latency``). Every rank of
    its TP group must call it equally often (``predict`` does); it gathers the group's rows itself."""

    def __init__(self, teacher: Teacher, config):
        super().__init__()
        self.teacher, self.config = teacher, config
        self.device = getattr(teacher, "device", None) or torch.device("cpu")

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None):
        from types import SimpleNamespace

        batch = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return SimpleNamespace(logits=self.teacher({k: v for k, v in batch.items() if v is not None}).logits)
