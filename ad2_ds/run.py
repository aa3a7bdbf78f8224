"""A distillation run is a function of its config: ``run_distillation(RunConfig(...)) -> results``.

    from ad2_ds import RunConfig, run_distillation
    from ad2_ds.run import DataConfig
    from ad2_ds.config import AD2Config

    config = RunConfig(deepspeed="ds_configs/zero2.json", data=DataConfig(task="movie-polarity"),
                       objective=AD2Config(method="ad2"), output_dir="runs/distill")
    results = run_distillation(config)       # what results.json holds (None on ranks that do not write it)

The run layer, by concern: :mod:`ad2_ds.run_config` (the two config classes), :mod:`ad2_ds.run_checks` (what is
checked before anything loads), :mod:`ad2_ds.run_data` (data), :mod:`ad2_ds.run_models` (models and tokenizers),
:mod:`ad2_ds.distill` (the run once its teacher is known), :mod:`ad2_ds.run_report` (scores, results, the summary
table). This module is the entry, and the one that knows the default teacher (:mod:`ad2_ds.default_teacher`, whose
fine-tune is itself a :func:`ad2_ds.distill.run_with_teacher`, so nothing imports back here).
"""

from typing import Optional, Sequence

from .distill import distill, prepare
from .run_checks import check_run, check_teacher_labels
from .run_config import DataConfig, RunConfig
from .run_data import load_data
from .run_models import classifier_config, load_classifier
from .run_report import score_test_split, summary_table

__all__ = [
    "DataConfig",
    "RunConfig",
    "check_run",
    "check_teacher_labels",
    "classifier_config",
    "load_classifier",
    "load_data",
    "run_distillation",
    "score_test_split",
    "summary_table",
]


def run_distillation(config: RunConfig, callbacks: Sequence = ()) -> Optional[dict]:
    """Run (or resume) one distillation and return its results (what ``output_dir/results.json`` holds) on the rank
    that writes them, None on the others. callbacks: :class:`ad2_ds.trainer.Callback` objects called around each
    step. Raises ValueError (ConfigError for a bad setting) before expensive work.

    1. check the config against the world, start the process group, read the data (bad data fails here);
    2. the teacher: the one named, or a default teacher fine-tuned once on this data and kept in the cache;
    3. load the models, measure the teacher, build the engine and the teacher, train, save, score the test split."""
    prepared = prepare(config)
    from .default_teacher import teacher_for_run

    # the one given ready, or a packaged base (MiniLM without --teacher, or all-mpnet-base-v2) fine-tuned on first use
    # several teachers: each member's path (a tuple), a packaged base fine-tuned here as a lone teacher is
    paths = tuple(teacher_for_run(m, prepared.task, prepared.ds_config) for m in config.member_configs())
    teacher_path = paths if len(paths) > 1 else paths[0]
    return distill(config, prepared, teacher_path, callbacks)
