"""The default teacher: a packaged base checkpoint fine-tuned on the task (or the user's own data) once, kept in the
cache, reused by later runs. all-MiniLM-L6-v2 without ``--teacher``; ``--teacher all-mpnet-base-v2`` (MPNet,
12 x 768, 110M) for a teacher of BERT-base size.

    path = teacher_for_run(config, task, ds_config)          # every rank; the first run fine-tunes
    path = ensure_default_teacher(config, task, ds_config)   # the same, when the run needs a default teacher

Fine-tuning is :func:`ad2_ds.distill.run_with_teacher` with no teacher, method ``finetune`` and the base model as
the student, in this process, on the run's own DeepSpeed JSON without its monitors. Each base model has its own
cache folder.
"""

import os
import shutil
from typing import Optional

from .base_teachers import DEFAULT_MODEL, MPNET_MODEL, base_teacher, check_base_teacher  # noqa: F401 (re-exported)
from .config import AD2Config

MONITORS = ("csv_monitor", "tensorboard", "wandb", "comet")
# The user's own data as the teacher is fine-tuned on it; not the test file (the student run scores the teacher on
# it), so the cached teacher depends only on what trains and chooses it.
CUSTOM_DATA_FIELDS = (
    "train_file", "validation_file", "dataset_name", "dataset_config_name", "text_column", "label_column",
    "task_type", "metric",
)  # fmt: skip


def _needs_teacher(config) -> bool:
    return config.objective.needs_teacher or not config.student


def teacher_for_run(config, task, ds_config: dict) -> Optional[str]:
    """The teacher the run loads: the one given ready, the default teacher (fine-tuned here on first use) when the
    run needs one, else None."""
    if base_teacher(config) is None:
        return config.teacher
    return ensure_default_teacher(config, task, ds_config) if _needs_teacher(config) else None


def default_teacher_dir(config, task) -> str:
    """Where the default teacher for ``config``'s data and teacher settings lives in the cache."""
    from .data.assets import cache_root
    from .data.offline import SPLIT_VERSION

    data = config.data
    # an offline task's default data is that layout's train split (v2: without the test examples), so a teacher
    # trained on the first layout, whose train held today's test examples, is never reused
    layout = f"-split{SPLIT_VERSION}" if task.is_offline and not data.data_dir else ""
    key = (
        f"{task.name}{layout}-{base_teacher(config)}-n{data.max_train_samples}-len{data.max_seq_length}"
        f"-e{config.teacher_epochs}-s{config.teacher_seed}"
    )
    if data.test_from_train:  # the teacher never trains on the examples the student is tested on
        key += f"-test{data.test_from_train:g}"
    if data.data_dir:
        key += "-" + os.path.abspath(data.data_dir).strip("/").replace("/", "_")
    if data.is_custom:  # the user's own data: keyed by its content, so two different CSVs never share a teacher
        key += "-data" + data.custom(check_files=True).fingerprint()
    return str(cache_root() / "teachers" / key)


def teacher_ds_config(student_ds_config: dict) -> dict:
    """The student run's DeepSpeed config without its monitors: the teacher's fine-tuning must not write its losses
    into the student's monitor files (DeepSpeed appends to them)."""
    return {k: v for k, v in student_ds_config.items() if k not in MONITORS}


def finetune_config(config, run_dir: str, ds_config: dict):
    """The fine-tuning run of the default teacher: the run's task and data, the base model, method finetune, the
    teacher's epochs and seed; everything else at its default."""
    from .run_config import DataConfig, RunConfig

    data = config.data
    return RunConfig(
        deepspeed=teacher_ds_config(ds_config),
        data=DataConfig(
            task=data.task,
            data_dir=data.data_dir,
            max_seq_length=data.max_seq_length,
            max_train_samples=data.max_train_samples,
            test_from_train=data.test_from_train,
            **{f: getattr(data, f) for f in CUSTOM_DATA_FIELDS},
        ),
        student=base_teacher(config),
        objective=AD2Config(method="finetune"),
        output_dir=run_dir,
        num_train_epochs=config.teacher_epochs,
        seed=config.teacher_seed,
        progress=config.progress,
        progress_label="teacher fine-tune",
    )


def ensure_default_teacher(config, task, ds_config: dict) -> str:
    """The default teacher for ``task``: :func:`base_teacher` fine-tuned here once, then reused from the cache."""
    import torch.distributed as dist

    from .distill import run_with_teacher
    from .utils import exclusive

    target = default_teacher_dir(config, task)
    with exclusive(target + ".lock", "teacher"):  # two runs started together: one fine-tunes, the other reuses
        if os.path.isfile(os.path.join(target, "config.json")):
            if dist.get_rank() == 0:
                print(f"teacher: reusing {target}", flush=True)
            return target
        run_dir = target + ".run"
        if dist.get_rank() == 0:
            base, epochs = base_teacher(config), config.teacher_epochs
            print(f"teacher: fine-tuning {base} on {task.name} ({epochs} epochs) -> {target}", flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
        dist.barrier()
        run_with_teacher(finetune_config(config, run_dir, ds_config), None)
        if dist.get_rank() == 0:
            os.replace(os.path.join(run_dir, "best"), target)  # atomic: a half-trained teacher is never reused
            shutil.copy(os.path.join(run_dir, "results.json"), os.path.join(target, "finetune_results.json"))
            shutil.rmtree(run_dir, ignore_errors=True)
        dist.barrier()
    return target
