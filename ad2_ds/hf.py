"""AD2 inside the transformers ``Trainer``: :class:`AD2Trainer` computes the AD² loss, the rest is the Trainer's.

    from transformers import TrainingArguments
    from ad2_ds import AD2Config
    from ad2_ds.hf import AD2Trainer, metrics_function

    trainer = AD2Trainer(
        model=student,                                   # any HF sequence classifier
        args=TrainingArguments("runs/x", deepspeed="ds_configs/zero2_auto.json", eval_strategy="epoch", ...),
        train_dataset=enc["train"], eval_dataset=enc["dev"],   # ad2_ds.data tokenized splits (``idx`` kept)
        data_collator=DataCollator(tokenizer.pad_token_id),
        compute_metrics=metrics_function(spec),
        teacher=teacher,                                 # a model, or any ad2_ds Teacher (DeepSpeedTeacher, cache)
                                                         # or several: [teacher_a, teacher_b], teacher_weights=[2, 1]
        ad2_config=AD2Config(method="ad2"),
    )
    trainer.train(); trainer.save_model("runs/x/student")   # AutoModelForSequenceClassification.from_pretrained

Training steps run :class:`~ad2_ds.objective.AD2Objective` (the same module the raw DeepSpeed loop uses) on the
teacher's outputs; the Trainer (and under ``deepspeed=`` its DeepSpeed engine) owns backward, optimizer, schedule,
precision, gradient accumulation, checkpoints and logging. Evaluation runs the student alone (loss: CE on labels).

- The teacher sits behind ad2_ds's one interface: an ``nn.Module`` becomes a
  :class:`~ad2_ds.teachers.local.LocalTeacher` (hidden states / attentions as the method needs); a ``Teacher``
  (``DeepSpeedTeacher``, ``CachedTeacher``, ...) is used as given.
- Deep-KD projections (student and teacher widths differ) are made before the Trainer builds its optimizer and
  are registered on the student as ``ad2_projections``, so whatever optimizer the Trainer or DeepSpeed builds
  trains them; :meth:`AD2Trainer._save` leaves them out of the saved student (which ``from_pretrained`` loads
  without warnings) and writes them beside it as ``ad2_projections.safetensors``.
- Every loss term (``ce``, ``kd``, ``ada``, ``hidden``, ``delta_norm_max``, ...) is averaged over the steps since the
  last log and over ranks, and logged as ``ad2/<term>`` next to the Trainer's ``loss``.
- The student runs through the DeepSpeed engine when there is one, or as it is on a single process. Plain DDP/FSDP
  wrappers are refused (AD2's extra forwards would bypass their gradient hooks): use ``deepspeed=``.
"""

import logging
import os
from typing import Dict, Optional

import torch
from torch import nn
from transformers import Trainer

from .config import AD2Config
from .losses import hard_loss
from .modeling import accepted_inputs, model_inputs
from .objective import AD2Objective
from .schedule import require_constant
from .teachers.base import TEACHER_PREFIX, Teacher
from .teachers.local import LocalTeacher

logger = logging.getLogger(__name__)
PROJECTIONS = "ad2_projections"
EXTRA_COLUMNS = ("idx",) + tuple(TEACHER_PREFIX + k for k in ("input_ids", "attention_mask", "token_type_ids"))


def as_teacher(teacher, cfg: AD2Config, device=None) -> Optional[Teacher]:
    """The ad2_ds teacher for ``teacher`` (None, a HF model, or a :class:`Teacher`), checked against what ``cfg``
    needs."""
    if teacher is None:
        if cfg.needs_teacher:
            raise ValueError(f"method {cfg.method!r} needs a teacher: pass teacher=model or an ad2_ds Teacher")
        return None
    if isinstance(teacher, Teacher):
        if cfg.needs_hidden_states and not teacher.output_hidden_states:
            raise ValueError(f"method {cfg.method!r} uses hidden states: build the teacher with output_hidden_states")
        if cfg.needs_attentions and not teacher.output_attentions:
            raise ValueError(f"method {cfg.method!r} uses attentions: build the teacher with output_attentions")
        return teacher
    if isinstance(teacher, nn.Module):
        return LocalTeacher(
            teacher,
            output_hidden_states=cfg.needs_hidden_states,
            output_attentions=cfg.needs_attentions,
            device=device,
        )
    raise TypeError(f"teacher must be None, an nn.Module or an ad2_ds Teacher, got {type(teacher).__name__}")


def as_ensemble(teachers, cfg: AD2Config, weights=None, hidden_source=None, device=None):
    """Several teachers (models or :class:`Teacher` objects) as one :class:`~ad2_ds.teachers.EnsembleTeacher` whose
    target is the weighted mean of their probabilities at ``cfg.temperature``; deep KD takes the hidden states of the
    member at index ``hidden_source`` (required then). Raises ValueError for bad weights or a missing source."""
    from .teachers.ensemble import EnsembleTeacher, normalized_weights

    teachers = list(teachers)
    normalized_weights(weights, len(teachers))  # the count, signs and sum checked before anything is wrapped
    if (cfg.needs_hidden_states or cfg.needs_attentions) and hidden_source is None and len(teachers) > 1:
        raise ValueError(
            f"method {cfg.method!r} matches hidden states: name the member that gives them (hidden_source)"
        )
    if cfg.mixup:
        raise ValueError("mixup labels new mixed points with one live teacher: pass one teacher, not a list")
    logits_only = AD2Config(method="kd", temperature=cfg.temperature)
    members = [as_teacher(t, cfg if m == hidden_source else logits_only, device) for m, t in enumerate(teachers)]
    return EnsembleTeacher(members, weights, cfg.temperature, hidden_source=hidden_source)


def _config_of(teacher):
    for obj in (teacher, getattr(teacher, "model", None), getattr(getattr(teacher, "engine", None), "module", None)):
        config = getattr(obj, "config", None)
        if config is not None and hasattr(config, "num_labels"):
            return config
    return None


def cpu_backend() -> list:
    """``Accelerator(kwargs_handlers=cpu_backend())``: on a machine without CUDA, name gloo as the process-group
    backend (``[]`` elsewhere). Trainer scripts pass ``TrainingArguments(ddp_backend="gloo")`` for the same reason.

    Without it, accelerate 1.x's DeepSpeed path on CPU gets every rank wrong (see also
    :func:`repair_cpu_deepspeed_state`): ``PartialState._prepare_backend`` only
    picks device backends (nccl, hccl, ...) when ``cpu=False``, so it returns None; DeepSpeed's
    ``init_distributed(dist_backend=None)`` still builds a gloo group of the full world, but accelerate, seeing
    ``backend is None``, sets ``num_processes = 1, process_index = 0`` ("No backend == no distributed training")
    before switching to ``DistributedType.DEEPSPEED``. Every rank then thinks it is the only one: data loaders are not
    sharded, every rank is the main process, and ``accelerator.gather`` fails in gloo's allgather.
    """
    import torch
    from accelerate.utils import InitProcessGroupKwargs

    return [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]


def repair_cpu_deepspeed_state() -> None:
    """Give accelerate's ``PartialState`` the real world when ``TrainingArguments(deepspeed=...)`` started it on CPU.

    transformers 5 builds that state for DeepSpeed without passing ``ddp_backend``, so on a machine without CUDA
    accelerate ends with ``backend=None, num_processes=1`` on every rank (see :func:`cpu_backend`) although DeepSpeed
    initialised torch.distributed over the whole world: the Trainer would not shard its data and every rank would
    save. This copies rank, world size and backend from torch.distributed into the shared state; it changes nothing
    elsewhere (CUDA, or a state that already has a backend). tests/test_hf_trainer.py's two-rank test checks it.
    """
    import torch.distributed as tdist
    from accelerate.state import DistributedType, PartialState

    if not PartialState._shared_state or not (tdist.is_available() and tdist.is_initialized()):
        return
    state = PartialState()
    if state.distributed_type == DistributedType.DEEPSPEED and state.backend is None:
        state.backend = tdist.get_backend()
        state.num_processes = tdist.get_world_size()
        state.process_index = tdist.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", state.process_index))


def reset_accelerator_state() -> None:
    """Let another Trainer with ``deepspeed=`` start in this process (a teacher fine-tuned, then a student distilled).

    accelerate 1.x refuses a second DeepSpeed ``Accelerator`` ("You cannot pass in a `deepspeed_plugin` when creating
    a second `Accelerator`"); this forgets its shared ``AcceleratorState`` and ``GradientState`` (plugins, mixed
    precision, accumulation), keeping the process group. It calls accelerate's private ``_reset_state`` (what
    accelerate's own tests do); tests/test_hf_trainer.py::test_reset_accelerator_state fails if an upgrade removes it.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def metrics_function(spec):
    """A ``compute_metrics`` for the Trainer: ad2_ds's metrics of ``spec`` (``eval_accuracy``, ``eval_macro_f1``)."""
    from .metrics import compute_metrics

    def compute(eval_pred) -> Dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return compute_metrics(spec, logits, eval_pred.label_ids)

    return compute


class AD2Trainer(Trainer):
    """A ``transformers.Trainer`` whose training loss is AD2's (see the module docstring).

    teacher: None (methods without a teacher), a HF model, or an ad2_ds :class:`Teacher`; or a list of them, an
        ensemble (:func:`as_ensemble`) weighted by ``teacher_weights`` (default equal), the hidden states (deep KD)
        taken from member ``hidden_source``.
    ad2_config: the objective's settings (default ``AD2Config()``, method "ad2").
    teacher_config: the teacher's HF config, when ``teacher`` is a Teacher that carries none (a cache) and the
        widths differ (deep-KD projections are built from it).
    Other arguments are the Trainer's; ``model`` is the student.
    """

    def __init__(self, model=None, args=None, *rest, teacher=None, ad2_config: Optional[AD2Config] = None,
                 teacher_config=None, teacher_weights=None, hidden_source=None, **kwargs):  # fmt: skip
        if model is None:
            raise ValueError("AD2Trainer needs model= (the student)")
        cfg = ad2_config or AD2Config()
        require_constant(cfg, "AD2Trainer")  # a schedule is a callback of ad2_ds.trainer's loop
        device = args.device if args is not None else None  # sets up accelerate's state (and the process group)
        repair_cpu_deepspeed_state()
        if isinstance(teacher, (list, tuple)):
            self.teacher = as_ensemble(teacher, cfg, teacher_weights, hidden_source, device)
            if teacher_config is None:
                teacher_config = _config_of(teacher[hidden_source or 0])
        else:
            self.teacher = as_teacher(teacher, cfg, device)
        if teacher_config is None and teacher is not None:
            teacher_config = _config_of(teacher)
        self.objective = AD2Objective(model, cfg, teacher_config=teacher_config if cfg.needs_teacher else None)
        if cfg.mixup:
            from .mixup import MixTeacher

            self.objective.mix_teacher = MixTeacher(self.teacher)
        if len(self.objective.projections):
            model.add_module(PROJECTIONS, self.objective.projections)  # trained by the Trainer's optimizer
        super().__init__(model, args, *rest, **kwargs)
        self.ad2_config = cfg
        self.loss_is_scaled_for_ga = False  # the objective's loss is a per-micro-batch mean
        self._accepted = accepted_inputs(model)
        self._term_sums: Dict[str, torch.Tensor] = {}
        self._term_count = 0

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # keep what the teacher needs: example ids (a cache) and the teacher's own tokenization
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, "label", *EXTRA_COLUMNS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            outputs = model(**model_inputs(inputs, self._accepted))
            loss = hard_loss(outputs.logits, inputs["labels"])
            return (loss, outputs) if return_outputs else loss
        self._bind(model)
        teacher_output = None
        if self.teacher is not None and self.ad2_config.needs_teacher:
            teacher_output = self.teacher(inputs).to(device=inputs["input_ids"].device)
        losses = self.objective(inputs, teacher_output)
        self._record(losses)
        return (losses["loss"], losses) if return_outputs else losses["loss"]

    def _bind(self, model) -> None:
        """Run the student through ``model`` when the Trainer wrapped it in a DeepSpeed engine."""
        if model is self.model or self.objective.engine is model:
            return
        try:
            from deepspeed import DeepSpeedEngine
        except ImportError:  # pragma: no cover - deepspeed is a dependency
            DeepSpeedEngine = ()
        if isinstance(model, nn.parallel.DistributedDataParallel) and self.args.world_size == 1:
            return  # a one-process "DDP": nothing to synchronise, the student is run directly
        if not isinstance(model, DeepSpeedEngine):
            raise ValueError(
                f"AD2Trainer runs the student directly or through DeepSpeed, not wrapped in {type(model).__name__} "
                "(its gradient hooks would miss AD2's extra forwards): pass TrainingArguments(deepspeed=...)"
            )
        self.objective.use_engine(model)

    def _record(self, losses: Dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            if key != "loss":
                self._term_sums[key] = self._term_sums.get(key, 0.0) + value.detach().float()
        self._term_count += 1

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._term_count:  # a training log: on every rank (the Trainer gathers its loss too)
            keys = sorted(self._term_sums)
            means = torch.stack([self._term_sums[k] for k in keys]).to(self.args.device) / self._term_count
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update({f"ad2/{k}": round(float(v), 6) for k, v in zip(keys, means)})
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """The student alone (projections left out), loadable by ``from_pretrained``; projections beside it."""
        if PROJECTIONS not in dict(self.model.named_children()):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.model.state_dict()
        prefix = PROJECTIONS + "."
        projections = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        student = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        projection_module = self.model._modules.pop(PROJECTIONS)  # save_pretrained walks the module tree
        try:
            super()._save(output_dir, student)
        finally:
            self.model._modules[PROJECTIONS] = projection_module
        if self.args.should_save and projections:
            from safetensors.torch import save_file

            tensors = {k: v.detach().cpu().contiguous() for k, v in projections.items()}
            save_file(tensors, os.path.join(output_dir, PROJECTIONS + ".safetensors"))
