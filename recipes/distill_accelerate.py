"""Distil inside an accelerate script: AD2Objective and an ad2_ds Teacher in a plain ``accelerator.prepare`` loop.

    accelerate launch --config_file ds_configs/accelerate_zero2.yaml recipes/distill_accelerate.py \
        --train_file data/train.csv --validation_file data/dev.csv --test_file data/test.csv \
        --teacher runs/mydata/teacher --output_dir runs/mydata-accelerate --method ad2
    python recipes/distill_accelerate.py ...        # one process, no DeepSpeed

Like accelerate's ``examples/nlp_example.py``: ``training_function(args)`` builds everything, one
``accelerator.prepare(objective, optimizer, loaders, scheduler)`` wires it. The objective (student + deep-KD
projections) is what is prepared, so under the DeepSpeed plugin (ZeRO-2, ``ds_configs/zero2_accelerate.json``) the
engine trains the projections too; the teacher (``--teacher``: a fine-tuned classifier, labels checked against the
data's) is a :class:`~ad2_ds.teachers.local.LocalTeacher` on the accelerator's device. The student is evaluated on
validation every epoch; the best is kept, scored once on test, and saved to ``OUTPUT_DIR/student``;
``OUTPUT_DIR/results.json`` holds the scores. Bad data or flags: one line, exit code 2, before any model is loaded.
"""

import argparse
import json
import os
import sys


def parse_args(argv=None):
    from ad2_ds import AD2Config
    from ad2_ds.flags import add_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train_file", required=True)
    p.add_argument("--validation_file", required=True)
    p.add_argument("--test_file")
    p.add_argument("--text_column", help="the text column, or two (A,B) for pairs; default: a guess")
    p.add_argument("--label_column")
    p.add_argument("--task_type", choices=("classification", "regression"))
    p.add_argument("--metric", help="the metric that picks the best student")
    p.add_argument("--teacher", required=True, help="a fine-tuned sequence classifier (folder)")
    p.add_argument("--student_layers", default="bottom:3", help="skip|top|bottom:N of the teacher's layers")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--seed", type=int, default=42)
    add_flags(p, AD2Config)  # --method and every term of the objective, as distill_glue.py takes them
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ad2_ds.data.assets import AssetError

    try:
        return training_function(args)
    except (ValueError, FileNotFoundError, AssetError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def training_function(args) -> int:
    import torch
    from accelerate import Accelerator
    from transformers import AutoConfig, get_linear_schedule_with_warmup, set_seed

    from ad2_ds import AD2Config, AD2Objective
    from ad2_ds.data.custom import load_custom_task, match_teacher_labels
    from ad2_ds.flags import from_flags
    from ad2_ds.hf import cpu_backend
    from ad2_ds.run import DataConfig
    from ad2_ds.schedule import require_constant

    cfg = from_flags(AD2Config, vars(args))
    require_constant(cfg, "recipes/distill_accelerate.py")
    data = DataConfig(
        train_file=args.train_file,
        validation_file=args.validation_file,
        test_file=args.test_file,
        text_column=args.text_column or (),
        label_column=args.label_column,
        task_type=args.task_type,
        metric=args.metric,
    ).custom()  # the options checked together, as distill_glue.py checks them
    strategy, _, n_layers = args.student_layers.partition(":")
    if strategy not in ("skip", "top", "bottom") or not n_layers.isdigit() or int(n_layers) < 1:
        raise ValueError(f"--student_layers {args.student_layers!r}: use skip|top|bottom:N, e.g. bottom:3")
    spec, raw = load_custom_task(data)  # bad data: exit 2 before any model
    match_teacher_labels(AutoConfig.from_pretrained(args.teacher), spec)  # another label set: exit 2 before training

    accelerator = Accelerator(kwargs_handlers=cpu_backend())
    set_seed(args.seed)
    teacher, student, tokenizer = build_models(args, spec, cfg, int(n_layers), strategy)
    enc, truncated = tokenize(raw, tokenizer, args.max_seq_length)
    collator = make_collator(tokenizer)
    train_loader = torch.utils.data.DataLoader(enc["train"], args.batch_size, shuffle=True, collate_fn=collator)

    objective = AD2Objective(student, cfg, teacher_config=teacher.config)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=args.learning_rate)
    total = args.num_train_epochs * len(train_loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * total), total)
    objective, optimizer, train_loader, scheduler = accelerator.prepare(objective, optimizer, train_loader, scheduler)
    from ad2_ds.teachers import LocalTeacher

    teacher_t = LocalTeacher(
        teacher,
        output_hidden_states=cfg.needs_hidden_states,
        output_attentions=cfg.needs_attentions,
        device=accelerator.device,
    )
    inner = accelerator.unwrap_model(objective)
    best, best_state, history, step = None, None, [], 0
    for epoch in range(args.num_train_epochs):
        objective.train()
        for batch in train_loader:
            losses = objective(batch, teacher_t(batch) if cfg.needs_teacher else None)
            accelerator.backward(losses["loss"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if args.max_steps and step >= args.max_steps:
                break
        scores = evaluate(inner.student, enc["dev"], collator, spec, args.batch_size, accelerator.device)
        history.append({"epoch": epoch + 1, "step": step, "loss": float(losses["loss"].detach()), **scores})
        accelerator.print(history[-1])
        if best is None or scores[spec.main_metric] > best[spec.main_metric]:
            best = scores
            best_state = {k: v.detach().cpu().clone() for k, v in inner.student.state_dict().items()}
        if args.max_steps and step >= args.max_steps:
            break

    inner.student.load_state_dict(best_state)
    results = {"task": spec.name, "method": cfg.method, "label_list": spec.label_list, "truncated": truncated}
    results["student"] = {"dev": best}
    splits = ["dev"] + ([spec.test_split] if spec.test_split else [])
    device = accelerator.device
    results["teacher"] = {s: evaluate(teacher, enc[s], collator, spec, args.batch_size, device) for s in splits}
    if spec.test_split:
        results["student"]["test"] = evaluate(inner.student, enc["test"], collator, spec, args.batch_size, device)
    results["history"] = history
    results["distributed_type"] = str(accelerator.distributed_type)
    results["num_processes"] = accelerator.num_processes
    accelerator.wait_for_everyone()
    out = os.path.join(args.output_dir, "student")
    inner.student.save_pretrained(out, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(out)
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    accelerator.print(json.dumps({k: results[k] for k in ("student", "teacher")}))
    accelerator.end_training()
    return 0


def build_models(args, spec, cfg, n_layers: int, strategy: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ad2_ds.data.custom import align_teacher_labels, set_label_names
    from ad2_ds.modeling import student_from_teacher

    kwargs = {"attn_implementation": "eager"} if cfg.needs_attentions else {}
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher, **kwargs)
    align_teacher_labels(teacher, spec)
    student = student_from_teacher(teacher, n_layers, strategy)
    student.requires_grad_(True)
    set_label_names(student.config, spec)
    return teacher, student, AutoTokenizer.from_pretrained(args.teacher)


def tokenize(raw, tokenizer, max_length):
    from ad2_ds.data.glue import tokenize_dataset

    return tokenize_dataset(raw, tokenizer, max_length=max_length)


def make_collator(tokenizer):
    from ad2_ds.data.glue import DataCollator

    return DataCollator(tokenizer.pad_token_id)


def evaluate(model, dataset, collator, spec, batch_size, device) -> dict:
    """Task metrics of ``model`` on ``dataset``, split across ranks (every example once), as the raw DeepSpeed
    loop computes them, so the numbers of both paths compare."""
    from ad2_ds.trainer import evaluate as evaluate_splits

    return evaluate_splits(model, {"eval": dataset}, collator, spec, batch_size, device)


if __name__ == "__main__":
    sys.exit(main())
