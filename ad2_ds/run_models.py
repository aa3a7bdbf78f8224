"""A run's models: the teacher (whole, or only its config when it loads its own shards later) and the student
(a given checkpoint, or layers cut from the teacher), with their tokenizers.

    models = load_models(config, task, teacher_path)       # Models(teacher, tok_t, student, tok_s, ...)
    config = fit_positions(config, models)                  # max_seq_length within the models' positions
    model = load_classifier(path, num_labels, eager, trust_remote_code, "student", task)
"""

import dataclasses
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def classifier_config(path, num_labels, trust_remote_code, role, task=None):
    """The checkpoint's config, checked for the task (see :func:`load_classifier`); reads no weights. A teacher for
    the user's own data is checked by label name by the caller, which also needs the label order
    (:func:`ad2_ds.data.custom.match_teacher_labels`)."""
    from transformers import AutoConfig

    custom = task is not None and task.is_custom
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    by_name = custom and role == "teacher"
    if has_head and not by_name and config.num_labels != num_labels:
        raise ValueError(f"{role} {path} predicts {config.num_labels} labels but the task has {num_labels}")
    if role == "teacher" and not has_head:
        raise ValueError(
            f"teacher {path} has no fine-tuned classification head: fine-tune it first "
            "(recipes/finetune_teacher.py --model ...) and pass its best/ folder"
        )
    return config


def load_classifier(path, num_labels, eager, trust_remote_code, role, task=None):
    """A sequence classifier for the task. A teacher must already have a trained head of the task's size; a student
    may start from a base checkpoint (a new head is made).

    For the user's own data (``task.is_custom``) a teacher's labels are checked by name instead
    (:func:`ad2_ds.data.custom.match_teacher_labels`: the same names in another order are remapped, unnamed
    ``LABEL_k`` map by position with a warning, another label set is an error) and its head is put in the data's
    order; a student gets the data's ``id2label`` / ``label2id``, so its saved config.json names the labels."""
    from transformers import AutoModelForSequenceClassification

    custom = task is not None and task.is_custom
    classifier_config(path, num_labels, trust_remote_code, role, task)
    kwargs = {"attn_implementation": "eager"} if eager else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, trust_remote_code=trust_remote_code, **kwargs
    )
    if custom:
        from .data.custom import align_teacher_labels, set_label_names

        align_teacher_labels(model, task) if role == "teacher" else set_label_names(model.config, task)
    return model


@dataclass
class Models:
    """The run's models and tokenizers (the teacher's are None for a method without one). A tensor-parallel or hosted
    teacher is never built whole here: ``teacher`` is then None, ``teacher_config`` its config and ``source`` where
    it is loaded from (:func:`ad2_ds.teachers.factory.live_teacher` loads its shards from there)."""

    teacher: object
    tok_t: object
    student: object
    tok_s: object
    teacher_config: object = None
    source: object = None

    @property
    def two_tokenizers(self) -> bool:
        return self.tok_t is not None and self.tok_t.get_vocab() != self.tok_s.get_vocab()


def load_teacher(config, task, teacher_path, sharded: bool = False):
    """(teacher model in eval mode, its tokenizer, its config, its TeacherSource), all None without a teacher path.
    sharded: a tensor-parallel teacher that loads its own shards later (:func:`ad2_ds.teachers.factory.live_teacher`),
    so only its config and tokenizer are read here: the model is None and the TeacherSource says where it loads from.
    A decoder classifier's tokenizer is set to pad on the right with a pad id its config knows
    (:func:`ad2_ds.teachers.decoder.prepare_decoder_teacher`)."""
    if teacher_path is None:
        return None, None, None, None
    from transformers import AutoTokenizer

    from .data.assets import resolve_model
    from .teachers.decoder import pools_last_token, prepare_decoder_teacher
    from .teachers.factory import TeacherSource

    path, eager, trust = resolve_model(teacher_path), config.objective.needs_attentions, config.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    if sharded:
        model, t_config = None, classifier_config(path, task.num_labels, trust, "teacher", task)
    else:
        model = load_classifier(path, task.num_labels, eager, trust, "teacher", task).eval()
        t_config = model.config
    if pools_last_token(t_config):  # right padding and a pad id the model pools by
        prepare_decoder_teacher(tokenizer, t_config)
    source = None
    if sharded:
        order = None
        if task.is_custom:  # the sharded head is not reordered: its logits are, as they come out
            from .data.custom import match_teacher_labels, set_label_names

            order = match_teacher_labels(t_config, task)
            set_label_names(t_config, task)
        source = TeacherSource(
            path, task.num_labels, "eager" if eager else None, trust, tokenizer.pad_token_id, order and tuple(order)
        )
    return model, tokenizer, t_config, source


def load_models(config, task, teacher_path) -> Models:
    """The teacher (when there is one) and the student: a given checkpoint, or layers taken from the teacher. A
    co-located tensor-parallel teacher (teacher_tp_size > 1) is not built here: each rank loads its own shards when the
    teacher is built; nor is the hosted layout's teacher on the student ranks (it lives on the teacher ranks; only a
    teacher without safetensors is loaded whole there, with a warning). A student made from the layers of a teacher
    not built here reads only the tensors it keeps (:func:`ad2_ds.teachers.sharded.student_from_checkpoint`)."""
    from transformers import AutoTokenizer

    from .data.assets import resolve_model
    from .modeling import student_from_teacher

    cfg, trust = config.objective, config.trust_remote_code
    sharded = config.teacher_tp_size > 1 and not config.teacher_ranks and cfg.needs_teacher
    if config.teacher_ranks:  # the hosted layout's student ranks: the teacher lives on the teacher ranks
        sharded = bool(config.student) or has_safetensors(teacher_path)
        if not sharded:
            logger.warning(
                "hosted layout: %s has no safetensors, so each student rank loads the teacher whole to cut the "
                "student from it and score it; re-save it with save_pretrained to read only the student's tensors",
                teacher_path,
            )
    teacher, tok_t, t_config, source = load_teacher(config, task, teacher_path, sharded)
    if config.student:
        path = resolve_model(config.student)
        student = load_classifier(path, task.num_labels, cfg.needs_attentions, trust, "student", task)
        tok_s = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    else:
        strategy, _, n = config.student_layers.partition(":")
        if teacher is None:  # a sharded teacher: read only the tensors the student keeps
            from .teachers.sharded import student_from_checkpoint

            kwargs = {"attn_implementation": "eager"} if cfg.needs_attentions else {}
            student = student_from_checkpoint(source.path, int(n), strategy, task.num_labels, trust, **kwargs)
            if task.is_custom:
                from .data.custom import align_teacher_labels

                align_teacher_labels(student, task)  # the head the student inherits, in the data's label order
        else:
            student = student_from_teacher(teacher, int(n), strategy)
        tok_s = tok_t
        if task.is_custom:
            from .data.custom import set_label_names

            set_label_names(student.config, task)  # the data's id2label / label2id in the saved config.json
    student.train()
    models = Models(teacher, tok_t, student, tok_s, t_config, source)
    if models.two_tokenizers and cfg.deep_kd:
        raise ValueError(
            f"method {cfg.method} compares hidden states token by token, but the teacher and student tokenizers "
            "differ: use method kd or ad2-dkd (logits only), pkd (pooled states through a learned projection), or a "
            "student built from the teacher (student_layers)"
        )
    return models


def has_safetensors(path) -> bool:
    """Whether a teacher folder can be read tensor by tensor (safetensors: one file or a sharded index)."""
    from .data.assets import resolve_model
    from .teachers.sharded import checkpoint_files

    try:
        checkpoint_files(resolve_model(path))
    except (ValueError, OSError):  # .bin only, no weights, or not a local folder
        return False
    return True


def fit_positions(config, models: Models):
    """The config with max_seq_length cut to the models' position embeddings (with a warning) when longer."""
    max_positions = min(
        getattr(c, "max_position_embeddings", 10**9)
        for c in (models.teacher_config, models.student.config)
        if c is not None
    )
    length = config.data.max_seq_length
    if length <= max_positions:
        return config
    logger.warning(
        "--max_seq_length %d exceeds the models' %d positions: using %d", length, max_positions, max_positions
    )
    return dataclasses.replace(config, data=dataclasses.replace(config.data, max_seq_length=max_positions))


def cache_data(config, models: Models, train_ds, collator, teacher_path):
    """What a teacher cache is built from and keyed by (None without --teacher_cache)."""
    if not config.teacher_cache:
        return None
    from .teachers.cache import fingerprint, state_dict_hash
    from .teachers.factory import CacheData

    parts = {
        "teacher": state_dict_hash(models.teacher) if config.teacher_tp_size == 1 else teacher_path,
        "tokenizer": fingerprint(sorted(models.tok_t.get_vocab().items())),
        "task": config.data.task,
        "data": getattr(train_ds, "_fingerprint", None) or fingerprint(train_ds["idx"]),
        "max_length": config.data.max_seq_length,
        "settings": config.teacher_settings(),
    }
    return CacheData(train_ds, collator, parts, config.rebuild_teacher_cache, config.progress)
