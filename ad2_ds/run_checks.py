"""The checks made before anything loads: a config against the world, and a given teacher's labels against the data.

    ds_config = check_run(config, world_size)   # files, the DeepSpeed JSON, the output folder, the ranks
    task, splits = load_data(config.data)
    check_teacher_labels(config, task)          # the teacher's config.json only (several: each, and alike)

Each raises :class:`ad2_ds.config.ConfigError` (or ValueError) with one line naming what to change, before any model
is fetched or trained.
"""

import os

from .config import ConfigError
from .run_config import RUN_FILES, RunConfig


def check_run(config: RunConfig, world_size: int) -> dict:
    """Check the config against the world before any expensive work; returns the loaded DeepSpeed JSON.
    world_size: every rank of the job (the hosted layout's teacher ranks included)."""
    import torch

    from .data.tasks import get_task
    from .dsconfig import check_ds_config, load_ds_config

    data = config.data
    if data.is_custom:
        from .data.custom import check_custom_files

        check_custom_files(data.custom())  # files, formats, UTF-8, columns: labels are checked when read
    else:
        get_task(data.task)
    from .members import hosted_ranks, rank_groups

    ranks = hosted_ranks(config)  # every rank hosting a teacher (several teachers: each member's own)
    student_world = world_size
    if ranks:
        from .dist import assign_teacher_ranks, check_teacher_ranks

        check_teacher_ranks(ranks, world_size)
        students = [r for r in range(world_size) if r not in ranks]
        for group in rank_groups(config):
            if group:
                assign_teacher_ranks(group, students)
        student_world -= len(ranks)
    for member in config.member_configs():  # each teacher's own placement (one teacher: the config itself)
        if not member.teacher_ranks and student_world % member.teacher_tp_size:
            where = f"the {student_world} student ranks" if ranks else f"the world size {world_size}"
            raise ConfigError("teacher_tp_size", f"{member.teacher_tp_size} does not divide {where}")
        _check_teacher_placement(member, len(member.teacher_ranks))
    if isinstance(config.deepspeed, dict):
        ds_config = config.deepspeed
        check_ds_config(ds_config, "the DeepSpeed config", student_world, torch.cuda.is_available())
    else:
        ds_config = load_ds_config(config.deepspeed, student_world)
    if data.data_dir and not os.path.isdir(data.data_dir):
        raise ConfigError("data_dir", f"{data.data_dir} is not a directory: point it at the GLUE data folder")
    if data.augment_copies:
        from .data.augment import default_wordnet_dir, missing_wordnet_files

        wordnet_dir = data.wordnet_dir or default_wordnet_dir()
        missing = missing_wordnet_files(wordnet_dir)
        if missing:
            raise ConfigError(
                "augment_copies",
                f"needs WordNet 3.0's database files, and wordnet_dir {wordnet_dir} lacks {', '.join(missing)}: "
                "apt install wordnet-base, or point wordnet_dir at a WordNet dict folder",
            )
    out = config.output_dir
    has_run = os.path.isdir(out) and any(os.path.exists(os.path.join(out, f)) for f in RUN_FILES)
    if has_run and not (config.resume or config.overwrite_output_dir):
        raise ConfigError(
            "output_dir",
            f"{out} already holds a run: set resume to continue it, overwrite_output_dir to replace it, "
            "or choose another output_dir",
        )
    from .base_teachers import check_base_teacher

    check_base_teacher(config.member_configs()[0])  # the student is cut from the first teacher
    if config.resume:
        from .checkpoint import check_resumable
        from .trainer import CKPT_DIR

        check_resumable(os.path.join(out, CKPT_DIR))
    return ds_config


def _check_teacher_placement(config: RunConfig, n_ranks: int) -> None:
    """One teacher's placement: a tensor-parallel one needs safetensors shards, fp16 a GPU."""
    import torch

    if (config.teacher_tp_size > 1 or n_ranks > 1) and config.teacher and os.path.isdir(config.teacher):
        from .teachers.sharded import checkpoint_files

        try:  # a tensor-parallel teacher loads shard by shard from safetensors (reads the file headers only)
            checkpoint_files(config.teacher)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError("teacher", f"{config.teacher}: {e}") from None
    if config.teacher_dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError("teacher_dtype", "fp16 needs a GPU; on CPU use bf16")


def check_teacher_labels(config: RunConfig, task) -> None:
    """A given teacher's labels against the user's data (its config.json only), right after the data is read: a
    teacher for another label set stops the run before anything is loaded or trained."""
    if len(config.teachers) > 1:
        return check_member_labels(config, task)  # each member's, and the members against each other
    if not (config.teacher and task.is_custom):
        return
    from transformers import AutoConfig

    from .data.assets import resolve_model
    from .data.custom import match_teacher_labels

    path = resolve_model(config.teacher)
    teacher_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if any(a.endswith("ForSequenceClassification") for a in (teacher_config.architectures or [])):
        match_teacher_labels(teacher_config, task)


def check_member_labels(config, task) -> None:
    """Each member's labels against the data (its config.json only; own data: by name, as for one teacher) and the
    members' tokenizers against the first one's, before any model loads; raises ValueError naming the member."""
    if len(config.teachers) <= 1:
        return
    if task.num_labels == 1 and config.teacher_rule != "mean":
        raise ConfigError("teacher_rule", f"{config.teacher_rule} is for classification: {task.name} is a regression")
    from transformers import AutoConfig, AutoTokenizer

    from .base_teachers import base_teacher
    from .data.assets import resolve_model

    trust, vocab0, names0 = config.trust_remote_code, None, None
    for member in config.member_configs():
        path = resolve_model(member.teacher)
        if base_teacher(member) is not None:
            pass  # a packaged base, fine-tuned here on this data's labels
        elif task.is_custom:
            check_teacher_labels(member, task)
        else:
            t_config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
            if t_config.num_labels != task.num_labels:
                raise ValueError(
                    f"teacher {member.teacher} predicts {t_config.num_labels} labels but the task has "
                    f"{task.num_labels}: every teacher must be fine-tuned on this task's labels"
                )
            names = [t_config.id2label[i] for i in range(t_config.num_labels)]
            if not all(str(n).startswith("LABEL_") for n in names):
                if names0 is not None and names != names0:
                    raise ValueError(
                        f"teacher {member.teacher} names its labels {names}, the first teacher {names0}: the members "
                        "must predict the same labels in the same order"
                    )
                names0 = names
        vocab = AutoTokenizer.from_pretrained(path, trust_remote_code=trust).get_vocab()
        if vocab0 is None:
            vocab0 = vocab
        elif vocab != vocab0:
            raise ValueError(
                f"teacher {member.teacher} has another tokenizer than {config.teachers[0]}: several teachers must "
                "share one tokenizer for now (run a teacher of another tokenizer alone, or cache it)"
            )
