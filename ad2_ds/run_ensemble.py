"""Several teachers in one run (``--teacher A --teacher B``): the ensemble built and scored, each member with its own
placement, and each member's seconds.

    teacher, report = build_ensemble(config, paths, models, objective, task, data, eval_context, first)
    member_seconds(teacher, results)           # after training: each member's seconds into results.json

The settings are checked by :mod:`ad2_ds.members` (in ``RunConfig``) and the members' labels and tokenizers by
:func:`ad2_ds.run_checks.check_member_labels`, before any model loads. Version 1 places every member co-located (each
live, tensor-parallel or cached, built by :func:`ad2_ds.teachers.factory.build_teacher` with its own placement) or
hosts it on ranks of its own (``--teacher_ranks 0/1``: :func:`ad2_ds.dist.split_member_ranks`, the member's teacher
ranks serve it as one hosted teacher is served; a hosted member is scored through its ranks). The members share
one tokenizer (the first member's: the ``teacher_`` columns when it differs from the student's). The student
(``--student_layers``) is cut from the first member, and
every later member is loaded after it with the RNG state kept, so weights 1,0 give the first member's run bit for bit.
"""

import dataclasses
import time

from .members import hidden_source_index


def build_ensemble(config, paths, models, objective, task, data, eval_context, first, layouts=()):
    """The run's :class:`~ad2_ds.teachers.ensemble.EnsembleTeacher` and the members' report. paths: each member's
    checkpoint (a packaged base already fine-tuned); ``first``: the first member's (teacher, live, report) as the
    single-teacher path built and scored them. data: (train_ds, collator); eval_context: (dev_sets, test_set,
    group); layouts: per member its hosted layout (:func:`ad2_ds.dist.split_member_ranks`; None: co-located), or
    () when every member is co-located."""
    import torch

    from .run_models import cache_data, load_teacher
    from .run_report import measure, measure_sharded_teacher, teacher_report
    from .teachers.ensemble import EnsembleTeacher
    from .teachers.factory import TeacherModel, TeacherNeeds, TeacherPlacement, build_teacher, live_teacher

    (train_ds, collator), (dev_sets, test_set, group) = data, eval_context
    members, source = config.member_configs(), hidden_source_index(config)
    needs = objective.teacher_needs()
    teacher0, live0, report0 = first
    hosted = [bool(layouts) and layouts[m] is not None for m in range(len(members))]
    scorer0 = (
        teacher0 if hosted[0] else live0 or live_teacher(models.teacher, TeacherNeeds(), members[0].teacher_dtype)
    )
    built, scorers, reports = [teacher0], [scorer0], [report0]
    with torch.random.fork_rng(devices=[]):  # the later members draw nothing from the run's RNG
        for m, member in enumerate(members[1:], start=1):
            clock = time.perf_counter()
            sharded = member.teacher_tp_size > 1 or hosted[m]  # never built whole here
            model, tok, t_config, src = load_teacher(member, task, paths[m], sharded)
            models_m = dataclasses.replace(models, teacher=model, tok_t=tok, teacher_config=t_config, source=src)
            layout = layouts[m] if hosted[m] else None
            placement = TeacherPlacement(member.teacher_tp_size, member.teacher_dtype, member.teacher_cache, layout)
            needs_m = needs if m == source else TeacherNeeds()
            live = None
            if sharded and not hosted[m]:
                live = live_teacher(None, needs_m, member.teacher_dtype, member.teacher_tp_size, source=src)
            cached = cache_data(member, models_m, train_ds, collator, paths[m])
            teacher = build_teacher(model, needs_m, placement, task.num_labels, cached, live=live)
            setup = time.perf_counter() - clock
            if sharded:  # scored through its live or hosted teacher
                through = teacher if hosted[m] else live
                report = measure_sharded_teacher(models_m, through, dev_sets, collator, task, group, test_set)
            else:
                report = measure(models_m, dev_sets, collator, task, group, test_set)
            report["teacher_setup_seconds"] = setup
            built.append(teacher)
            scorers.append(teacher if hosted[m] else live or live_teacher(model, TeacherNeeds(), member.teacher_dtype))
            reports.append(report)
    combine = dict(weights=config.teacher_weights or None, temperature=objective.config.temperature,
                   rule=config.teacher_rule)  # fmt: skip
    scorer = EnsembleTeacher(scorers, **combine)  # live members: a cache cannot score dev
    ensemble_report = teacher_report(
        TeacherModel(scorer, models.teacher_config), models, dev_sets, task, group, test_set
    )
    ensemble = EnsembleTeacher(built, hidden_source=source, names=list(config.teachers), **combine)
    member_keys = ("teacher_scores", "teacher_test", "teacher_params", "teacher_latency_ms", "teacher_setup_seconds")
    report = {
        **ensemble_report,
        "teacher_params": sum(r.get("teacher_params") or 0 for r in reports),
        "teacher_members": [
            {"teacher": member.teacher, "path": path, "weight": w, **{k: r[k] for k in member_keys if k in r}}
            for member, path, w, r in zip(members, paths, ensemble.weights, reports)
        ],
    }
    return ensemble, report


def member_seconds(teacher, results) -> None:
    """Each member's seconds of teacher work during training, into ``results["teacher_members"]``."""
    for entry, seconds in zip(results.get("teacher_members", ()), getattr(teacher, "seconds", ())):
        entry["train_seconds"] = seconds
