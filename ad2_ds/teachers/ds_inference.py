"""A tensor-parallel teacher on DeepSpeed inference (AutoTP)::

    dist.init_distributed()
    teacher = DeepSpeedTeacher(model, tp_size=2, dtype=torch.bfloat16, output_hidden_states=True)
    out = teacher(batch)       # every rank passes its own data-parallel micro-batch; gets back its own rows
    teacher = DeepSpeedTeacher.from_pretrained("teachers/bert-large-mnli", tp_size=2, dtype=torch.bfloat16)
                               # each rank loads only its own shards from safetensors (see sharded.py)

Ranks are grouped in consecutive blocks of ``tp_size`` (world 4, tp 2: {0, 1} and {2, 3}); each block holds one
sharded copy of the teacher. A TP group must run the teacher on identical inputs (otherwise the all-reduces mix
different examples and the logits are silently wrong), so ``__call__`` all-gathers the group's micro-batches
(variable rows and lengths: padded to the longest with the pad id and a zero attention mask), runs the teacher once on
the union, and returns each rank its own rows cropped to its own length. Before running, a checksum of the inputs is
compared across the group (all_reduce MIN and MAX) and a mismatch raises.

Attention maps: AutoTP leaves each rank only its own heads; they are all-gathered along the head dim, so the returned
attentions are complete ([B, heads, T, T]) and equal the unsharded model's.

Per-head parameters AutoTP leaves whole (MPNet's relative-position bias, shared by all layers) are sliced to the rank's
heads after sharding (:func:`~ad2_ds.teachers.sharded.shard_head_parameters`). Decoder classifiers (Llama, Qwen2,
Mistral) need right padding and a pad id in their config (:mod:`ad2_ds.teachers.decoder`); left-padded batches are
refused.

The teacher's collectives run on process groups of its own (``dist.new_group``), never the default group, so a
:class:`~ad2_ds.teachers.stream.StreamingTeacher` can run it in a background thread while the student's engine
communicates on the default group (gloo; see stream.py for NCCL).
"""

from typing import Callable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as tdist

from .. import dist
from ..modeling import accepted_inputs
from . import fill, sharded
from .base import Teacher, TeacherOutput
from .decoder import check_decoder_padding, is_decoder_classifier
from .local import check_attn_implementation, freeze, model_inputs

# Model types whose AutoTP sharding was measured to differ from the unsharded model (issue 14, docs/RESULTS.md)
UNSHARDABLE = {
    "deberta-v2": "a tiny random DeBERTa-v2 at tp_size=2 differs by 3e-3 in its last hidden state in fp32, whether "
    "loaded shard by shard or sharded whole",
}


class _TPGroup:
    """The model-parallel unit DeepSpeed's InferenceEngine accepts (``tensor_parallel.mpu``): with it, the engine uses
    our group instead of building its own over ranks [0, tp_size), which is wrong for a world bigger than tp_size."""

    def __init__(self, group, tp_size: int):
        self.group, self.tp_size = group, tp_size

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self) -> int:
        return tdist.get_rank(self.group)

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size


def new_tp_groups(tp_size: int):
    """Create one process group per block of ``tp_size`` consecutive ranks (a collective: every rank calls it) and
    return the block this rank belongs to."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, tp_size):
        ranks = list(range(start, start + tp_size))
        group = tdist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def input_checksum(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per key: the shape and a position-weighted sum (so a permutation changes it too), in float64."""
    parts = []
    for k in sorted(inputs):
        x = inputs[k].detach().reshape(-1).to(torch.float64)
        w = torch.arange(x.numel(), device=x.device, dtype=torch.float64).remainder_(65521).add_(1)
        parts.append(torch.tensor([*inputs[k].shape], dtype=torch.float64, device=x.device))
        parts.append((x * w).sum().reshape(1))
    return torch.cat(parts)


def check_identical_inputs(inputs: Mapping[str, torch.Tensor], group) -> None:
    """Raise on every rank of ``group`` when its ranks hold different inputs (all ranks raise together: no hang)."""
    lo = input_checksum(inputs)
    hi = lo.clone()
    tdist.all_reduce(lo, op=tdist.ReduceOp.MIN, group=group)
    tdist.all_reduce(hi, op=tdist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        raise ValueError(
            "DeepSpeedTeacher: the ranks of a tensor-parallel group got different inputs; a TP teacher must run on "
            "the same batch on every rank of its group (its all-reduces would mix different examples and give wrong "
            "logits without any error). Keep gather_inputs=True, or feed the same batch to every rank of the group."
        )


class DeepSpeedTeacher(Teacher):
    """A frozen HF model sharded with ``deepspeed.init_inference`` (AutoTP, no kernel injection).

    tp_size: ranks per teacher copy (default: the world size); must divide the world size and the attention heads.
    dtype: torch.float32 or torch.bfloat16 on CPU; float16 is GPU-only.
    gather_inputs: gather the TP group's micro-batches (see the module doc). Set False only when every rank of a group
        already gets the same batch (then each rank gets the whole output back).
    verify_inputs: compare an input checksum across the group before running (two tiny all_reduces).
    pad_token_id: pads shorter micro-batches when gathering (default: the model config's, else 0).
    group: an existing process group to shard over instead of consecutive blocks of the world (the hosted layout's
        teacher ranks: ``group=layout.teacher_group``); tp_size is then its size. Only its ranks build the teacher:
        DeepSpeed's own world collective in ``init_inference`` (an RNG broadcast from rank 0) is run on the group.
    label_order: the teacher output serving each of the data's labels (``logits[:, label_order]``), when the teacher
        names the same labels in another order (:func:`ad2_ds.data.custom.match_teacher_labels`); None: as they are.
    load_weights: called with the engine's module right after ``init_inference`` (``from_pretrained`` passes a meta
        skeleton and fills the shards the engine allocated, :mod:`ad2_ds.teachers.fill`).
    init_inference_kwargs: passed to ``deepspeed.init_inference``.
    Logits come back in fp32, hidden states and attentions in ``dtype``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tp_size: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        gather_inputs: bool = True,
        verify_inputs: bool = True,
        pad_token_id: Optional[int] = None,
        group=None,
        label_order: Optional[Sequence[int]] = None,
        load_weights: Optional[Callable[[torch.nn.Module], object]] = None,
        **init_inference_kwargs,
    ):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if dtype == torch.float16 and not torch.cuda.is_available():
            raise ValueError(
                "DeepSpeedTeacher: dtype=torch.float16 is not supported by DeepSpeed on CPU; use torch.bfloat16 "
                "(or torch.float32)"
            )
        check_attn_implementation(model, output_attentions)
        dist.init_distributed()
        world = dist.get_world_size()
        if group is not None:
            size = dist.get_world_size(group)
            if tp_size is not None and int(tp_size) != size:
                raise ValueError(f"DeepSpeedTeacher: tp_size={tp_size} but the given group has {size} ranks")
            tp_size = size
        tp_size = world if tp_size is None else int(tp_size)
        if tp_size < 1 or (group is None and world % tp_size != 0):
            raise ValueError(f"DeepSpeedTeacher: tp_size={tp_size} must divide the world size {world}")
        heads = getattr(model.config, "num_attention_heads", None)
        if heads is not None and heads % tp_size != 0:
            raise ValueError(
                f"DeepSpeedTeacher: tp_size={tp_size} must divide the teacher's {heads} attention heads "
                "(AutoTP shards whole heads)"
            )
        kv_heads = getattr(model.config, "num_key_value_heads", None)
        if kv_heads is not None and kv_heads % tp_size != 0:
            raise ValueError(
                f"DeepSpeedTeacher: tp_size={tp_size} must divide the teacher's {kv_heads} key/value heads "
                "(grouped-query attention: AutoTP shards whole key/value heads)"
            )
        if tp_size > 1 and getattr(model.config, "model_type", None) in UNSHARDABLE:
            raise ValueError(
                f"DeepSpeedTeacher: {type(model).__name__} under AutoTP does not match the unsharded model "
                f"({UNSHARDABLE[model.config.model_type]}); run this teacher with tp_size=1 (--teacher_tp_size 1)"
            )
        if is_decoder_classifier(model) and getattr(model.config, "pad_token_id", None) is None:
            raise ValueError(
                f"DeepSpeedTeacher: {type(model).__name__} pools the last token that is not the pad token, but its "
                "config has no pad_token_id; call ad2_ds.teachers.decoder.prepare_decoder_teacher(tokenizer, "
                "model.config) first"
            )
        self.tp_size = tp_size
        if tp_size == 1:
            self.group = None
        else:
            self.group = group if group is not None else new_tp_groups(tp_size)
        tp = {"tp_size": tp_size}
        if self.group is not None:
            tp.update(tp_group=self.group, mpu=_TPGroup(self.group, tp_size))
        with dist.default_group(group):
            self.engine = deepspeed.init_inference(
                freeze(model),
                tensor_parallel=tp,
                dtype=dtype,
                replace_with_kernel_inject=False,
                **init_inference_kwargs,
            )
        if load_weights is not None:
            load_weights(self.engine.module)
        if tp_size > 1 and heads is not None:
            sharded.shard_head_parameters(self.engine.module, tdist.get_rank(self.group), tp_size, heads)
        left_on_meta = sharded.meta_tensors(self.engine.module)
        if left_on_meta:
            raise RuntimeError(
                f"DeepSpeedTeacher: {len(left_on_meta)} tensors were never loaded (still on meta: {left_on_meta[:3]})"
            )
        self.device = torch.device(get_accelerator().current_device_name())
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.gather_inputs = gather_inputs
        self.verify_inputs = verify_inputs
        self.num_labels = model.config.num_labels
        self.hidden_size = getattr(model.config, "hidden_size", None)
        if pad_token_id is None:
            pad_token_id = getattr(model.config, "pad_token_id", None)
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self._accepted = accepted_inputs(model)
        self._decoder = is_decoder_classifier(model)
        self.label_order = None if label_order is None else list(label_order)
        self.loaded = "whole"  # "shards": each rank read only its own from the checkpoint (from_pretrained)

    @classmethod
    def from_pretrained(
        cls,
        path,
        tp_size: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        num_labels: Optional[int] = None,
        attn_implementation: Optional[str] = None,
        trust_remote_code: bool = False,
        pad_token_id: Optional[int] = None,
        scratch_dir=None,
        **kwargs,
    ) -> "DeepSpeedTeacher":
        """A TP teacher loaded from a safetensors checkpoint folder shard by shard: each rank builds an empty skeleton
        (parameters on meta), AutoTP shards it and the engine allocates only this rank's shards, which are then read
        from the safetensors files slice by slice and cast in place (:mod:`ad2_ds.teachers.fill`), so no rank ever
        holds the whole model nor a full-size temporary of any tensor. A layer AutoTP shards in another way (fused
        QKV, ...) falls back to DeepSpeed's own shard loader (one file at a time, see :mod:`ad2_ds.teachers.sharded`).

        Before loading, the checkpoint's keys must cover the skeleton (one clear line otherwise) and ``.bin``
        checkpoints are refused. After loading, no parameter or buffer may be left unloaded. Any model at tp_size 1
        is loaded whole; on DeepSpeed's loader (the fallback), so is a model with a parameter that loader does not
        fill (a warning names it).
        pad_token_id: the teacher's pad id when its config has none (decoders: the tokenizer's, after
            :func:`~ad2_ds.teachers.decoder.prepare_decoder_teacher`); written into the config.
        scratch_dir: where a bridge file goes when a module's tensors span two checkpoint files (default: a temp dir;
            DeepSpeed's loader only).
        kwargs: the other :class:`DeepSpeedTeacher` arguments.
        """
        import logging
        import tempfile

        from transformers import AutoModelForSequenceClassification

        dist.init_distributed()
        group = kwargs.get("group")
        size = tp_size or (dist.get_world_size(group) if group is not None else dist.get_world_size())
        config_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        files = sharded.checkpoint_files(path) if int(size) > 1 else None

        def skeleton():
            model = sharded.empty_classifier(path, num_labels, trust_remote_code, **config_kwargs)
            if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
                model.config.pad_token_id = int(pad_token_id)
            return model

        model = skeleton()
        log = logging.getLogger(__name__)
        if files:
            sharded.check_keys_cover(model, files, path)
            buffers = fill.snapshot_buffers(model)  # init_inference's to_empty wipes the skeleton's real buffers
            try:
                teacher = cls(
                    model,
                    tp_size=tp_size,
                    dtype=dtype,
                    pad_token_id=pad_token_id,
                    load_weights=lambda module: fill.fill_from_checkpoint(module, path, files, buffers),
                    **kwargs,
                )
            except fill.UnsupportedLayout as e:  # decided from the layers alone, before any read: same on every rank
                log.warning("DeepSpeedTeacher.from_pretrained: %s: %s; DeepSpeed's own shard loader is used", path, e)
                model = skeleton()
            else:
                fill.release_freed_memory()
                teacher.loaded = "shards"
                return teacher
        blocker = sharded.sharded_load_blocker(model) if files else None
        if files and blocker is None:
            with tempfile.TemporaryDirectory(dir=scratch_dir) as scratch:
                ckpt = sharded.ds_checkpoint_kwargs(path, files, scratch)
                teacher = cls(model, tp_size=tp_size, dtype=dtype, pad_token_id=pad_token_id, **ckpt, **kwargs)
            fill.release_freed_memory()  # what DeepSpeed's full-size temporaries left in the heap
            teacher.loaded = "shards"
            return teacher
        if blocker is not None:
            log.warning(
                "DeepSpeedTeacher.from_pretrained: %s is loaded whole on every rank, then sharded: %s", path, blocker
            )
        model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code, config=model.config, **config_kwargs
        )
        return cls(model, tp_size=tp_size, dtype=dtype, pad_token_id=pad_token_id, **kwargs)

    def _gather_heads(self, attn: torch.Tensor) -> torch.Tensor:
        # attn: [B, heads / tp, T, T] -> [B, heads, T, T]; AutoTP gives group rank r the r-th contiguous block.
        parts = [torch.empty_like(attn) for _ in range(self.tp_size)]
        tdist.all_gather(parts, attn.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> TeacherOutput:
        inputs = model_inputs(batch, self._accepted, self.device)
        info = None
        if self.group is not None and self.gather_inputs:
            inputs, info = dist.gather_batches(inputs, self.group, pad_values={"input_ids": self.pad_token_id})
        if self._decoder:
            check_decoder_padding(inputs.get("attention_mask"))
        if self.group is not None and self.verify_inputs:
            check_identical_inputs(inputs, self.group)
        out = self.engine(
            **inputs,
            output_hidden_states=self.output_hidden_states,
            output_attentions=self.output_attentions,
            return_dict=True,
        )
        hidden: Optional[List[torch.Tensor]] = list(out.hidden_states) if self.output_hidden_states else None
        attn: Optional[List[torch.Tensor]] = list(out.attentions) if self.output_attentions else None
        if attn is not None and self.group is not None:
            attn = [self._gather_heads(a) for a in attn]
        logits = out.logits.float()
        if self.label_order is not None:
            logits = logits[:, self.label_order]
        if info is not None:
            logits = dist.slice_for_rank(logits, info)
            hidden = None if hidden is None else [dist.slice_for_rank(h, info, seq_dims=(1,)) for h in hidden]
            attn = None if attn is None else [dist.slice_for_rank(a, info, seq_dims=(2, 3)) for a in attn]
        return TeacherOutput(logits=logits, hidden_states=hidden, attentions=attn)
