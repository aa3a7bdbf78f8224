"""One distillation run whose teacher is known: data -> models -> teacher -> engine -> train -> save.

    prepared = prepare(config)                                 # checks, the process group, the data
    results = distill(config, prepared, teacher_path)          # None on the ranks that do not write results.json
    results = run_with_teacher(config, teacher_path)           # both

:func:`ad2_ds.run.run_distillation` is the entry: it fine-tunes the default teacher between the two steps when the run
needs one and names none. The default teacher's own fine-tune is a :func:`run_with_teacher` with no teacher (method
``finetune``), so this module never imports :mod:`ad2_ds.default_teacher`.
"""

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from .flags import as_flat_dict
from .run_checks import check_run, check_teacher_labels
from .run_config import RUN_FILES, RunConfig
from .run_data import has_labelled_test, load_data, make_collator, tokenize_splits
from .run_models import cache_data, fit_positions, load_models, load_teacher
from .run_report import (
    engine_facts,
    measure,
    measure_sharded_teacher,
    score_test_split,
    state_results,
    teacher_load,
)

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What the checks and the data step give the run: the DeepSpeed JSON, the task, its raw splits, and the seconds
    spent so far by phase."""

    ds_config: dict
    task: object
    splits: dict
    setup_seconds: dict


def prepare(config: RunConfig) -> Prepared:
    """Check the config against the world, start the process group, read the data (bad data fails here, before any
    model is fetched or trained) and check a given teacher's labels against it."""
    from .dist import init_distributed, setup_single_process_env

    setup_single_process_env()
    ds_config = check_run(config, int(os.environ.get("WORLD_SIZE", "1")))
    init_distributed()
    clock = time.perf_counter()
    task, splits = load_data(config.data)
    check_teacher_labels(config, task)
    from .ascent import check_ascent  # ascent free: one rank, and its δ store fits in memory
    from .members import hosted_ranks

    check_ascent(config, splits, int(os.environ.get("WORLD_SIZE", "1")) - len(hosted_ranks(config)))
    return Prepared(ds_config, task, splits, {"load_and_augment_data": time.perf_counter() - clock})


def run_with_teacher(config: RunConfig, teacher_path: Optional[str], callbacks: Sequence = ()) -> Optional[dict]:
    """:func:`prepare` then :func:`distill` with ``teacher_path`` (None: a method without a teacher)."""
    return distill(config, prepare(config), teacher_path, callbacks)


def distill(config: RunConfig, prepared: Prepared, teacher_path, callbacks: Sequence = ()) -> Optional[dict]:
    """Train the student of ``config`` against the teacher at ``teacher_path``; the results on the rank that writes
    results.json, None on the others (the hosted layout's teacher ranks serve until the students close)."""
    import torch.distributed as dist
    from transformers import set_seed

    from .ascent import attach_delta_store
    from .engine import build_engine
    from .objective import AD2Objective
    from .teachers.factory import TeacherPlacement, build_teacher, live_teacher
    from .trainer import train

    task, ds_config, setup_seconds = prepared.task, prepared.ds_config, prepared.setup_seconds
    cfg, whole, paths = config.objective, config, teacher_path
    if isinstance(teacher_path, tuple):  # several teachers: the first is built as a lone teacher is, then the others
        config, teacher_path = config.member_configs()[0], teacher_path[0]
    layout = None  # hosted layout: the student trains on its student group, the teacher ranks only serve
    layouts = ()  # several teachers, some hosted: one layout per member (None: co-located)
    from .members import hidden_source_index, rank_groups

    if whole is not config and any(rank_groups(whole)):
        from .dist import split_member_ranks

        layouts = split_member_ranks(rank_groups(whole))
        served = next((m for m, lay in enumerate(layouts) if lay is not None and lay.role == "teacher"), None)
        if served is not None:  # this rank hosts one member: serve it until the students close
            member, lay = whole.member_configs()[served], layouts[served]
            set_seed(config.seed)
            placement = TeacherPlacement(member.teacher_tp_size, member.teacher_dtype, None, lay)
            return _serve(member, task, paths[served], placement, hidden_source_index(whole) in (None, served))
        layout = layouts[0]
    elif config.teacher_ranks:
        from .dist import split_ranks

        layout = split_ranks(config.teacher_ranks)
    placement = TeacherPlacement(config.teacher_tp_size, config.teacher_dtype, config.teacher_cache, layout)
    set_seed(config.seed)
    if layout is not None and layout.role == "teacher":
        return _serve(config, task, teacher_path, placement)
    engine_layout = layout or next((lay for lay in layouts if lay is not None), None)  # the students' groups
    group = engine_layout.student_group if engine_layout is not None else None
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    models = load_models(config, task, teacher_path)
    config, fitted = fit_positions(config, models), config
    whole = config if whole is fitted else dataclasses.replace(whole, data=config.data)  # the lengths fitted
    tokenized, truncated = tokenize_splits(config, prepared.splits, models, group)
    collator = make_collator(models)
    train_ds, dev_sets = tokenized["train"], {split: tokenized[split] for split in task.dev_splits}

    clock = time.perf_counter()
    test_set = {task.test_split: tokenized[task.test_split]} if has_labelled_test(task, tokenized) else {}
    report = measure(models, dev_sets, collator, task, group, test_set)  # before DeepSpeed shards anything
    setup_seconds["evaluate_teacher_and_latency"], clock = time.perf_counter() - clock, time.perf_counter()
    teacher_config = models.teacher_config if cfg.needs_teacher else None
    objective = AD2Objective(models.student, cfg, teacher_config=teacher_config)
    store_report = attach_delta_store(objective, train_ds)  # ascent free's δ per example: {} for the others
    engine, ds_config = build_engine(
        objective, ds_config, len(train_ds), config.num_train_epochs, engine_layout, config.keep_zero_stage
    )
    setup_seconds["objective_and_engine"], clock = time.perf_counter() - clock, time.perf_counter()
    teacher = live = None
    if cfg.needs_teacher:
        needs = objective.teacher_needs()
        if models.source is not None and layout is None:  # tensor-parallel, loaded shard by shard
            live = live_teacher(None, needs, placement.dtype, placement.tp_size, source=models.source)
            setup_seconds["teacher_load"], clock = time.perf_counter() - clock, time.perf_counter()
        data = cache_data(config, models, train_ds, collator, teacher_path)
        teacher = build_teacher(models.teacher, needs, placement, task.num_labels, data, live=live)
        if cfg.mixup:
            from .mixup import MixTeacher

            objective.mix_teacher = MixTeacher(teacher)
        if models.source is not None:  # never built here: scored through the live or the hosted teacher
            built, clock = time.perf_counter() - clock, time.perf_counter()
            through = live if layout is None else teacher
            report.update(measure_sharded_teacher(models, through, dev_sets, collator, task, group, test_set))
            setup_seconds["evaluate_teacher_and_latency"] += time.perf_counter() - clock
            clock = time.perf_counter() - built  # the teacher's setup below counts its build too
        if whole is not config:
            from .run_ensemble import build_ensemble

            first = (teacher, live, report)
            teacher, ensemble_report = build_ensemble(whole, paths, models, objective, task, (train_ds, collator),
                                                      (dev_sets, test_set, group), first, layouts)  # fmt: skip
            report.update(ensemble_report)
    setup_seconds["teacher"] = time.perf_counter() - clock  # includes building the teacher cache when there is one

    out = prepare_output_dir(config, rank, group)
    from .schedule import schedule_callbacks  # ε and η over the run, unless constant

    callbacks = [*schedule_callbacks(cfg, objective, engine, group), *callbacks]
    config = whole  # the run's own config from here on (several teachers: all of them)
    try:
        state = train(
            engine,
            teacher,
            train_ds,
            dev_sets,
            collator,
            task,
            config.train_config(),
            on_best=lambda record: save_best(objective, models.tok_s, out, record, group),
            resume=config.resume,
            group=group,
            callbacks=callbacks,
            run_config=config.to_dict(),
        )
    finally:
        if engine_layout is not None:
            teacher.close()  # the teacher ranks return once every student rank closed (each hosted member's)

    results = {
        "task": task.name,
        "main_metric": task.main_metric,
        "labels": list(task.label_list) if task.label_list else None,  # the student's id2label for own data
        "method": cfg.method,
        "config": cfg.to_dict(),
        "run_config": config.to_dict(),
        "args": as_flat_dict(config),
        "ds_config": ds_config,
        "world_size": world_size,
        "teacher_ranks": list(config.teacher_ranks),
        "teacher": list(paths) if isinstance(paths, tuple) else paths,
        "teacher_load": teacher_load(live, models, layout),
        "student_init": config.student or config.student_layers,
        "train_examples": len(train_ds),  # with augment_copies N: (N + 1) x the originals
        **state_results(state),
        "setup_seconds": setup_seconds,
        "overflow_skipped_steps": engine.skipped_steps,
        "truncated": truncated,
        "engine": engine_facts(engine),
        **store_report,
        **report,
    }
    if hasattr(teacher, "member_seconds"):
        from .run_ensemble import member_seconds

        member_seconds(teacher, results)
    test = score_test_split(task, tokenized, collator, out, config, engine, group)
    if test is not None:
        results["test"] = test
    if rank != 0:
        return None
    from .utils import write_json_atomic

    write_json_atomic(os.path.join(out, "results.json"), results)
    return results


def _serve(config, task, teacher_path, placement, hidden: bool = True) -> None:
    """A teacher rank of the hosted layout: load the teacher (its own shards when several ranks host it) and serve
    the student ranks until they close. hidden: False for a member of several teachers that is not the source of
    hidden states (it computes logits only)."""
    import torch.distributed as dist

    from .teachers.factory import TeacherNeeds, serve_hosted_teacher

    cfg = config.objective
    teacher_model, _, _, source = load_teacher(config, task, teacher_path, len(config.teacher_ranks) > 1)
    needs = TeacherNeeds(() if cfg.needs_hidden_states and hidden else None, cfg.needs_attentions and hidden)
    stats = serve_hosted_teacher(teacher_model, needs, placement, source)
    secs = stats["teacher_seconds"]
    logger.info("teacher rank %d served %s requests in %.1f s", dist.get_rank(), stats["requests"], secs)


def prepare_output_dir(config, rank, group) -> str:
    import torch.distributed as dist

    out = config.output_dir
    if rank == 0:
        if config.overwrite_output_dir and not config.resume:
            clear_run(out)
        os.makedirs(out, exist_ok=True)
    dist.barrier(group)
    return out


def save_best(objective, tokenizer, out, record, group) -> None:
    from .modeling import save_pretrained_atomic

    extra = {"ad2_best.json": record}
    save_pretrained_atomic(objective.student, tokenizer, os.path.join(out, "best"), extra=extra, group=group)


def clear_run(out):
    import shutil

    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
