"""What a run reports: both models' scores, parameters and latency, the test split scored once, results.json's
parts, and the summary table the command line prints.

    report = measure(models, dev_sets, collator, task, group, test_set)   # before DeepSpeed shards anything
    test = score_test_split(task, tokenized, collator, out, config, engine, group)
    print(summary_table(task, results))
"""

import os
from typing import Optional

from .run_data import has_labelled_test, teacher_view
from .run_models import Models, load_classifier


def measure(models: Models, dev_sets, collator, task, group, test_set=None) -> dict:
    """Parameters and latency of both models, and the teacher's dev scores (and test scores, given ``test_set``)."""
    from .modeling import count_parameters, measure_latency

    report = {
        "student_params": count_parameters(models.student),
        "student_latency_ms": measure_latency(models.student, dev_sets, collator),
    }
    if models.teacher is not None:
        report.update(teacher_report(models.teacher, models, dev_sets, task, group, test_set))
        report["teacher_params"] = count_parameters(models.teacher)
    return report


def measure_sharded_teacher(models: Models, live, dev_sets, collator, task, group, test_set=None) -> dict:
    """The tensor-parallel teacher's dev scores (and test scores, given ``test_set``), parameters (counted on its empty
    skeleton) and latency, through the live teacher (every rank runs the same forwards; the TP group gathers its
    rows)."""
    from .modeling import count_parameters
    from .teachers.factory import TeacherModel
    from .teachers.sharded import empty_classifier

    report = teacher_report(TeacherModel(live, models.teacher_config), models, dev_sets, task, group, test_set)
    src = models.source
    report["teacher_params"] = count_parameters(empty_classifier(src.path, src.num_labels, src.trust_remote_code))
    return report


def teacher_report(model, models: Models, dev_sets, task, group, test_set=None) -> dict:
    """A teacher's dev scores and latency (and test scores, given ``test_set``), on its own tokens when the two
    tokenizers differ."""
    from .data.glue import DataCollator
    from .modeling import measure_latency
    from .trainer import evaluate

    def view(sets):
        return sets if not models.two_tokenizers else {k: teacher_view(v) for k, v in sets.items()}

    t_collator = DataCollator(models.tok_t.pad_token_id)
    report = {
        "teacher_scores": evaluate(model, view(dev_sets), t_collator, task, 32, group=group),
        "teacher_latency_ms": measure_latency(model, view(dev_sets), t_collator),
    }
    if test_set:
        report["teacher_test"] = evaluate(model, view(test_set), t_collator, task, 32, group=group)
    return report


def teacher_load(live, models: Models, layout) -> Optional[str]:
    """How the run's teacher was loaded: "shards" (each rank read only its own from the checkpoint), "whole", "hosted"
    (on the teacher ranks: shard by shard when several), None without a teacher."""
    if layout is not None:
        return "hosted"
    if live is not None:
        return live.loaded
    return "whole" if models.teacher is not None else None


def state_results(state) -> dict:
    return {
        "history": state.history,
        "best": {"step": state.best_step, **state.best_scores},
        "train_seconds": state.train_seconds,
        "samples_per_second": state.samples / max(state.train_seconds, 1e-9),
        "teacher_wait_seconds": state.teacher_wait_seconds,
        "nonfinite_skipped": state.nonfinite_skipped,
        **({"schedule": state.schedule} if state.schedule is not None else {}),  # the radius schedule's last state
    }


def engine_facts(engine) -> dict:
    return {
        "micro_batch": engine.train_micro_batch_size_per_gpu(),
        "grad_accum": engine.gradient_accumulation_steps(),
        "bf16": engine.bfloat16_enabled(),
        "fp16": engine.fp16_enabled(),
        "zero_stage": engine.zero_optimization_stage(),
    }


def score_test_split(task, tokenized, collator, out, config, engine, group) -> Optional[dict]:
    """The best student (chosen on the dev split, saved in ``out/best``) scored once on the task's labelled test
    split; None when the task has none, or it is unlabelled."""
    if not has_labelled_test(task, tokenized):
        return None
    split = task.test_split
    from .trainer import evaluate

    best = load_classifier(
        os.path.join(out, "best"), task.num_labels, False, config.trust_remote_code, "student", task
    )
    device = next(engine.module.student.parameters()).device
    return evaluate(best.to(device), {split: tokenized[split]}, collator, task, 32, device, group)


def summary_table(task, results) -> str:
    """Teacher vs student: the main metric on dev (and test when scored), parameters, latency; where the student is.
    task: the run's TaskSpec, or None to read its name and main metric from ``results``."""
    metric = task.main_metric if task is not None else results["main_metric"]
    name = task.name if task is not None else results["task"]
    members = results.get("teacher_members") or []
    rows = [("", "ensemble" if members else "teacher", "student")]
    t_score = results.get("teacher_scores", {}).get(metric)
    rows.append((f"dev {metric}", _fmt(t_score), _fmt(results["best"].get(metric))))
    if "test" in results:
        t_test = results.get("teacher_test", {}).get(metric)
        rows.append((f"test {metric}", _fmt(t_test), _fmt(results["test"].get(metric))))
    rows.append(("parameters", _millions(results.get("teacher_params")), _millions(results["student_params"])))
    rows.append(
        ("latency ms/batch of 32", _fmt(results.get("teacher_latency_ms"), 1), _fmt(results["student_latency_ms"], 1))
    )
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{r[0]:<{width}}{r[1]:>12}{r[2]:>12}" for r in rows]
    lines += _member_lines(members, metric, "test" in results)
    out = results["run_config"]["output_dir"]
    lines.append(f"{name}, method {results['method']}: best student saved to {os.path.join(out, 'best')}")
    lines.append(
        f"train {results['train_seconds']:.0f} s, {results['samples_per_second']:.1f} samples/s, "
        f"waited {results['teacher_wait_seconds']:.1f} s on the teacher"
    )
    return "\n".join(lines)


def _member_lines(members, metric, with_test) -> list:
    """Several teachers: each member's weight, dev (and test) score and seconds of teacher work in training."""
    lines = []
    for m, member in enumerate(members, start=1):
        test = f", test {metric} {_fmt(member.get('teacher_test', {}).get(metric))}" if with_test else ""
        lines.append(
            f"teacher {m} (weight {member['weight']:.2f}): dev {metric} "
            f"{_fmt(member.get('teacher_scores', {}).get(metric))}{test}, {member.get('train_seconds', 0.0):.1f} s "
            f"in training, {member['teacher']}"
        )
    return lines


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def _millions(n):
    return "-" if n is None else f"{n / 1e6:.1f}M"
