"""Distil on your own labelled data with the transformers Trainer and AD2Trainer, end to end.

    python recipes/distill_trainer.py --train_file data/train.csv --validation_file data/dev.csv \
        --test_file data/test.csv --output_dir runs/mydata --method ad2 --num_train_epochs 3
    deepspeed --num_gpus 2 recipes/distill_trainer.py ... --deepspeed ds_configs/zero2_auto.json

1. Reads the data (:mod:`ad2_ds.data.custom`; ``--text_column`` / ``--label_column`` / ``--task_type`` /
   ``--main_metric``); bad data is one line and exit code 2 before any model is loaded.
2. Teacher: ``--teacher DIR`` (a fine-tuned classifier; its labels are checked against the data's and reordered
   when only the order differs), else ``--teacher_base`` (default: the packaged all-MiniLM-L6-v2) fine-tuned here on
   the training split for ``--teacher_epochs``, best on validation kept (``OUTPUT_DIR/teacher``).
3. Student: ``--student DIR`` or the teacher's layers chosen by ``--student_layers`` (``bottom:3``), with the data's
   ``id2label``; distilled by :class:`ad2_ds.hf.AD2Trainer` with ``--method`` (kd, ad2, ad2-dkd, ...), evaluated on
   validation every epoch, the best kept, saved to ``OUTPUT_DIR/student`` (``from_pretrained`` loads it).
4. The chosen teacher and student are scored once on the test split (when given): ``OUTPUT_DIR/results.json`` and
   a summary table hold validation and test.

Every ``TrainingArguments`` flag applies (``--per_device_train_batch_size``, ``--learning_rate``, ``--deepspeed``,
``--bf16``, ``--logging_steps``, ...); evaluation and checkpoint selection are per epoch on the main metric.
"""

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

logger = logging.getLogger("distill_trainer")


@dataclass
class DataArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "csv, tsv, json, jsonl or parquet"})
    validation_file: Optional[str] = field(default=None, metadata={"help": "picks the best checkpoint"})
    test_file: Optional[str] = field(default=None, metadata={"help": "labelled; scored once at the end"})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "a hub dataset instead of files"})
    dataset_config_name: Optional[str] = None
    text_column: List[str] = field(default_factory=list, metadata={"help": "one, or two for pairs; default: guess"})
    label_column: Optional[str] = field(default=None, metadata={"help": "default: label or labels"})
    task_type: Optional[str] = field(default=None, metadata={"help": "classification or regression; default: guess"})
    main_metric: Optional[str] = field(default=None, metadata={"help": "default: accuracy (spearmanr: regression)"})
    task_name: Optional[str] = field(default=None, metadata={"help": "default: the training file's folder name"})
    max_seq_length: int = 128


@dataclass
class DistillArguments:
    teacher: Optional[str] = field(default=None, metadata={"help": "fine-tuned classifier; default: fine-tune one"})
    teacher_base: str = field(default="all-MiniLM-L6-v2", metadata={"help": "base model for the teacher"})
    teacher_epochs: float = 3.0
    teacher_learning_rate: float = 5e-5
    student: Optional[str] = field(default=None, metadata={"help": "student checkpoint; default: teacher layers"})
    student_layers: str = field(default="bottom:3", metadata={"help": "skip|top|bottom:N of the teacher's layers"})


def parse(argv=None):
    from transformers import HfArgumentParser, TrainingArguments

    from ad2_ds import AD2Config
    from ad2_ds.flags import add_flags, from_flags

    parser = HfArgumentParser((DataArguments, DistillArguments, TrainingArguments))
    add_flags(parser, AD2Config)  # --method and every term of the objective, as distill_glue.py takes them
    data_args, distill_args, training_args, objective = parser.parse_args_into_dataclasses(args=argv)
    return data_args, distill_args, training_args, from_flags(AD2Config, vars(objective))


def main(argv=None) -> int:
    from ad2_ds.dist import setup_single_process_env

    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in args):
        setup_single_process_env()  # a plain `python` run is a one-rank job (DeepSpeed needs RANK, MASTER_PORT, ...)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ad2_ds.data.assets import AssetError

    try:
        data_args, distill_args, training_args, cfg = parse(args)
        return run(data_args, distill_args, training_args, cfg)
    except (ValueError, FileNotFoundError, AssetError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def run(data_args: DataArguments, distill_args: DistillArguments, training_args, cfg) -> int:
    from transformers import AutoConfig, AutoTokenizer, set_seed

    from ad2_ds.data.assets import resolve_model
    from ad2_ds.data.custom import CustomData, load_custom_task, match_teacher_labels
    from ad2_ds.data.glue import DataCollator, tokenize_dataset
    from ad2_ds.schedule import require_constant

    require_constant(cfg, "recipes/distill_trainer.py")
    out = training_args.output_dir
    if os.path.exists(os.path.join(out, "results.json")) and not training_args.overwrite_output_dir:
        raise ValueError(f"--output_dir {out} already holds a run: pass --overwrite_output_dir or another folder")
    data = CustomData(
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        test_file=data_args.test_file,
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        text_columns=tuple(data_args.text_column),
        label_column=data_args.label_column,
        task_type=data_args.task_type,
        main_metric=data_args.main_metric,
        name=data_args.task_name,
    )
    spec, raw = load_custom_task(data)  # bad data fails here, before any model
    teacher_path = resolve_model(distill_args.teacher) if distill_args.teacher else None
    if teacher_path is not None:
        match_teacher_labels(AutoConfig.from_pretrained(teacher_path), spec)  # a different label set: exit 2 now
    set_seed(training_args.seed)
    base_path = teacher_path or resolve_model(distill_args.teacher_base)
    tokenizer = AutoTokenizer.from_pretrained(distill_args.student or base_path)
    enc, truncated = tokenize_dataset(raw, tokenizer, max_length=data_args.max_seq_length)
    collator = DataCollator(tokenizer.pad_token_id)
    clock = time.perf_counter()

    if teacher_path is None:
        teacher, teacher_scores = finetune_teacher(
            spec, enc, collator, tokenizer, base_path, distill_args, training_args
        )
    else:
        teacher = load_teacher(teacher_path, spec, eager=cfg.needs_attentions)
        teacher_scores = None
    teacher_seconds = time.perf_counter() - clock
    student = build_student(teacher, spec, distill_args, eager=cfg.needs_attentions)
    args = epoch_selection(training_args, spec, os.path.join(out, "checkpoints"))
    trainer = make_trainer(student, args, spec, enc, collator, tokenizer, teacher=teacher, ad2_config=cfg)
    clock = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - clock
    trainer.save_model(os.path.join(out, "student"))
    student_scores = score(trainer, spec, enc)
    if teacher_scores is None:
        teacher_scores = score_model(teacher, spec, enc, collator, args)
    results = {
        "task": spec.name,
        "method": cfg.method,
        "ad2_config": cfg.to_dict(),
        "data": dataclasses.asdict(data),
        "label_list": list(spec.label_list) if spec.label_list else None,
        "main_metric": spec.main_metric,
        "sizes": {split: len(ds) for split, ds in raw.items()},
        "truncated": truncated,
        "teacher": {"path": teacher_path or os.path.join(out, "teacher"), **teacher_scores},
        "student": {"path": os.path.join(out, "student"), **student_scores},
        "seconds": {"teacher": round(teacher_seconds, 1), "distill": round(train_seconds, 1)},
        "log_history": trainer.state.log_history,
        "deepspeed": training_args.deepspeed,
        "deepspeed_enabled": trainer.is_deepspeed_enabled,
        "num_processes": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(summary_table(spec, results))
    return 0


def epoch_selection(training_args, spec, output_dir):
    """The user's TrainingArguments, evaluating every epoch and keeping the best on the main metric."""
    return dataclasses.replace(
        training_args,
        output_dir=output_dir,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model=spec.main_metric,
        greater_is_better=True,
        save_total_limit=1,
        report_to=training_args.report_to or [],
    )


def make_trainer(model, args, spec, enc, collator, tokenizer, teacher=None, ad2_config=None):
    from ad2_ds import AD2Config
    from ad2_ds.hf import AD2Trainer, metrics_function, reset_accelerator_state

    reset_accelerator_state()  # the teacher's Trainer may have made a DeepSpeed Accelerator already
    return AD2Trainer(
        model=model,
        args=args,
        train_dataset=enc["train"],
        eval_dataset=enc["dev"],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=metrics_function(spec),
        teacher=teacher,
        ad2_config=ad2_config or AD2Config(method="finetune"),
    )


def score(trainer, spec, enc) -> dict:
    """Validation scores of the trainer's (best) model, and test scores once when there is a test split."""
    scores = {"dev": _strip(trainer.evaluate(enc["dev"], metric_key_prefix="eval"), "eval_")}
    if spec.test_split:
        scores["test"] = _strip(trainer.evaluate(enc[spec.test_split], metric_key_prefix="test"), "test_")
    return scores


def score_model(model, spec, enc, collator, args) -> dict:
    """A given teacher's validation (and test) scores, split across ranks (no Trainer: no second engine)."""
    from ad2_ds.trainer import evaluate

    splits = ["dev"] + ([spec.test_split] if spec.test_split else [])
    batch_size = args.per_device_eval_batch_size
    return {s: evaluate(model, {s: enc[s]}, collator, spec, batch_size, args.device) for s in splits}


def _strip(metrics: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def finetune_teacher(spec, enc, collator, tokenizer, base_path, distill_args, training_args):
    """The base model with a new head, fine-tuned on train (CE only), best epoch on validation; saved."""
    from transformers import AutoModelForSequenceClassification

    from ad2_ds.data.custom import set_label_names

    model = AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=spec.num_labels, attn_implementation="eager"
    )
    set_label_names(model.config, spec)
    out = training_args.output_dir
    args = epoch_selection(training_args, spec, os.path.join(out, "teacher-checkpoints"))
    args = dataclasses.replace(
        args, num_train_epochs=distill_args.teacher_epochs, learning_rate=distill_args.teacher_learning_rate
    )
    trainer = make_trainer(model, args, spec, enc, collator, tokenizer)
    trainer.train()
    trainer.save_model(os.path.join(out, "teacher"))
    scores = score(trainer, spec, enc)
    return trainer.model, scores


def load_teacher(path, spec, eager: bool):
    from transformers import AutoModelForSequenceClassification

    from ad2_ds.data.custom import align_teacher_labels

    kwargs = {"attn_implementation": "eager"} if eager else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    return align_teacher_labels(model, spec)


def build_student(teacher, spec, distill_args, eager: bool):
    from transformers import AutoModelForSequenceClassification

    from ad2_ds.data.custom import set_label_names
    from ad2_ds.modeling import student_from_teacher

    if distill_args.student:
        kwargs = {"attn_implementation": "eager"} if eager else {}
        student = AutoModelForSequenceClassification.from_pretrained(
            distill_args.student, num_labels=spec.num_labels, ignore_mismatched_sizes=True, **kwargs
        )
    else:
        strategy, _, n = distill_args.student_layers.partition(":")
        if strategy not in ("skip", "top", "bottom") or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--student_layers {distill_args.student_layers!r}: use skip|top|bottom:N, e.g. bottom:3")
        student = student_from_teacher(teacher, int(n), strategy)
        student.requires_grad_(True)
        student.train()
    set_label_names(student.config, spec)
    return student


def summary_table(spec, results) -> str:
    metrics = list(spec.metric_names)
    head = f"| model | {' | '.join(f'dev {m}' for m in metrics)}"
    if spec.test_split:
        head += f" | {' | '.join(f'test {m}' for m in metrics)}"
    lines = [head + " |", "|" + "---|" * (head.count("|"))]
    for who in ("teacher", "student"):
        r = results[who]
        cells = [f"{r['dev'][m]:.4f}" for m in metrics]
        if spec.test_split:
            cells += [f"{r['test'][m]:.4f}" for m in metrics]
        name = who if who == "teacher" else f"student ({results['method']})"
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    code = main()
    from ad2_ds.dist import clean_exit

    clean_exit(code)
