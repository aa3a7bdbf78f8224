"""How much each perturbation setting moves the adversarial KD loss, against what a second dropout draw moves it.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/perturbation_effect.py --task movie-polarity \\
        --teacher ~/.cache/ad2_ds/teachers/movie-polarity-splitv2-all-MiniLM-L6-v2-n2000-len64-e3-s42 \\
        --json_out docs/results/perturbation_effect.json

A fine-tuned teacher and a student (``--student``: a trained one, e.g. a kd run's ``best/``; default: the teacher's
bottom 3 layers, untrained, whose logits barely depend on the input), on the first
``--batches`` x ``--batch_size`` dev sentences. For every setting of ``benchmarks/ad2_selection.py`` (and the paper's
literal one) it reports, averaged over batches:

- ``ada_over_kd - 1``: (KD loss on the perturbed input) / (KD loss on the clean input) − 1, both in eval mode (no
  dropout), δ from the setting's own ascent: what the perturbation does to the loss it is trained on;
- ``delta_relative``: mean over tokens of ‖δ_t‖₂ / ‖e_t‖₂ (e: the clean tensor where δ is added);
- and once, ``dropout``: |KD(draw 1) / KD(draw 2) − 1| for two train-mode forwards without δ, the size of the change
  the ε = 0 control trains on.

Forward and ascent only, no training: a minute on a CPU.
"""

import argparse
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETTINGS_EXTRA = {"paper-literal (ex-l2 1e-5)": ["--method", "ad2-dkd", "--epsilon", "1e-5", "--step_size", "1e-3"]}


def config_for(flags):
    """The objective (AD2Config) that ``distill_glue`` would run with these flags: the run layer's own parser."""
    from ad2_ds.cli import config_from_args, run_parser

    return config_from_args(run_parser(__doc__).parse_args(flags)).objective


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="movie-polarity")
    p.add_argument("--teacher", required=True, help="a fine-tuned teacher folder")
    p.add_argument("--student", help="a trained student folder (default: the teacher's bottom 3 layers, untrained)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--json_out")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.teacher, "config.json")):
        p.error(f"--teacher {args.teacher} holds no model: pass a fine-tuned teacher folder")

    from ad2_selection import SETTINGS
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ad2_ds import AD2Objective, TeacherOutput
    from ad2_ds.data.glue import DataCollator, load_task, tokenize_dataset
    from ad2_ds.data.tasks import get_task
    from ad2_ds.losses import kd_loss
    from ad2_ds.modeling import student_from_teacher

    torch.manual_seed(0)
    task = get_task(args.task)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(args.teacher)
    dev = load_task(task, splits=task.dev_splits[:1])
    enc, _ = tokenize_dataset(dev, tok, 64)
    ds = enc[task.dev_splits[0]]
    collate = DataCollator(tok.pad_token_id)
    batches = [
        collate([ds[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)]) for b in range(args.batches)
    ]
    with torch.no_grad():
        t_out = [TeacherOutput(teacher(**_inputs(b)).logits) for b in batches]
    if args.student:
        student = AutoModelForSequenceClassification.from_pretrained(args.student, attn_implementation="eager")
    else:
        student = student_from_teacher(teacher, 3, "bottom")

    student.train()
    drop = []
    for b, t in zip(batches, t_out):
        with torch.no_grad():
            k1 = kd_loss(student(**_inputs(b)).logits, t.logits)
            k2 = kd_loss(student(**_inputs(b)).logits, t.logits)
        drop.append(abs((k1 / k2).item() - 1))
    student.eval()

    rows = {}
    for name, flags in {**SETTINGS_EXTRA, **SETTINGS}.items():
        cfg = config_for(flags)
        if not cfg.adversarial:
            continue
        obj = AD2Objective(student, cfg)
        ratios, rel = [], []
        for b, t in zip(batches, t_out):
            torch.manual_seed(0)
            losses = obj(b, t)
            ratios.append(losses["ada"].item() / losses["kd"].item() - 1)
            rel.append(losses["delta_relative"].item())
        obj.close()
        rows[name] = {"ada_over_kd_minus_1": statistics.mean(ratios), "delta_relative": statistics.mean(rel)}
        print(f"{name:<28} ada/kd - 1 = {rows[name]['ada_over_kd_minus_1']:+.3e}   "
              f"|δ_t|/|e_t| = {rows[name]['delta_relative']:.3e}", flush=True)  # fmt: skip
    print(f"{'dropout (two draws, δ = 0)':<28} |kd1/kd2 - 1| = {statistics.mean(drop):.3e}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "command": "PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/perturbation_effect.py "
                    + " ".join(argv or sys.argv[1:]),
                    "task": task.name,
                    "split": task.dev_splits[0],
                    "examples": args.batches * args.batch_size,
                    "student": args.student or "teacher's bottom 3 layers, untrained",
                    "mode": "eval (no dropout) for the perturbation rows, train for the dropout row",
                    "dropout_abs_kd_ratio_minus_1": statistics.mean(drop),
                    "settings": rows,
                },
                f,
                indent=1,
            )
    return 0


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


if __name__ == "__main__":
    sys.exit(main())
