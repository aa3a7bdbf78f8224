"""Vanilla KD samples/s: ad2-ds (AD2Objective(method="kd") in a one-rank DeepSpeed engine) next to TextBrewer and a
plain PyTorch loop, on the same models, batches, optimizer, steps and temperature.

    PYTHONPATH=. python benchmarks/peer_textbrewer.py --threads 1 --rounds 5 --steps 4 \
        --json_out docs/results/peer_textbrewer.json
    PYTHONPATH=. python benchmarks/peer_textbrewer.py --threads 1 --e2e_only --json_out docs/results/peer_e2e.json

Models: random-weight BERTs, student shaped like a 3-layer MiniLM (hidden 384, 12 heads, FFN 1536, vocab 30522),
teacher the same with 6 layers (all-MiniLM-L6-v2's shape); HF's default (sdpa) attention. Batches: fixed length
(every row ``--seq_len`` real tokens), ``--n_batches`` distinct ones cycled. Every contender has its own copy of one
initial student, its own ``torch.optim.AdamW(lr=1e-4)``, no clipping, no scheduler; the teacher is shared, frozen,
run live (no grad) every step; loss = CE(labels) + KD(T) with weights 1 and 1.

Contenders:
- ``plain``: a hand-written loop (teacher forward, student forward with labels, CE + ad2_ds.losses.kd_loss,
  zero_grad, backward, AdamW.step) - the reference;
- ``textbrewer``: TextBrewer's ``BasicDistiller`` (``kd_loss_type="ce"``, ``hard_label_weight=1``; the student's
  adaptor passes HF's own CE loss as ``losses``) trained with ``distiller.train(optimizer, batches, num_steps=N)``;
  ``ckpt_steps`` is huge and the end-of-train checkpoint is disabled (``save_and_callback`` is a no-op), so no file
  is written inside the timing; its per-step loss logging (``.item()`` into a no-op writer) stays;
- ``textbrewer-general``: the same through ``GeneralDistiller`` (no intermediate matches), what its examples use;
- ``ad2ds-1rank``: the ZeRO-2 config as ``recipes/distill_glue.py`` runs it on one rank (``single_rank_config``:
  stage 0, and ``skip_single_rank_allreduce``: no all-reduce over a world of one);
- ``ad2ds-z0`` / ``ad2ds-z2``: ``LocalTeacher`` + ``AD2Objective(student, AD2Config(method="kd"))`` wrapped by
  ``deepspeed.initialize`` (torch AdamW with ``zero_allow_untested_optimizer``; ZeRO stage 0, and stage 2 as in
  ``ds_configs/zero2.json``), the loop ``engine(batch, teacher(batch)); engine.backward; engine.step``.

Timing: one untimed warm-up of each contender, then ``--rounds`` rounds; each round runs every contender for
``--steps`` steps (order rotated each round, one untimed step at each switch) and times the N steps as one block.
samples/s = N x batch / seconds. Ratios are taken inside each round (ad2-ds / peer), then min / median / max.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import common
from common import quiet


def minilm_config(layers: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=layers, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512, num_labels=2)


def fixed_batches(n: int, batch_size: int, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 30522, (batch_size, seq_len), generator=g)
        ids[:, 0] = 101
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.randint(0, 2, (batch_size,), generator=g)})
    return out


class Cycle:
    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def make_plain(student, teacher, batches, temperature, lr):
    from ad2_ds.losses import kd_loss

    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()
    it = Cycle(batches)

    def run(n):
        for _ in range(n):
            b = it.next()
            with torch.no_grad():
                logits_t = teacher(**{k: b[k] for k in INPUTS}).logits
            out = student(**b)
            loss = out.loss + kd_loss(out.logits, logits_t, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def make_textbrewer(student, teacher, batches, temperature, lr, general: bool):
    import textbrewer
    from textbrewer import DistillationConfig, TrainingConfig

    outdir = tempfile.mkdtemp(prefix="tb-bench-")
    train_config = TrainingConfig(device="cpu", ckpt_steps=10**9, log_dir=None, output_dir=outdir)
    distill_config = DistillationConfig(temperature=temperature, kd_loss_type="ce", kd_loss_weight=1.0,
                                        hard_label_weight=1.0, intermediate_matches=[] if general else None)

    def adaptor_t(batch, out):
        return {"logits": out.logits}

    def adaptor_s(batch, out):
        return {"logits": out.logits, "losses": out.loss}

    cls = textbrewer.GeneralDistiller if general else textbrewer.BasicDistiller
    distiller = cls(train_config, distill_config, teacher, student, adaptor_t, adaptor_s)
    distiller.save_and_callback = lambda *a, **k: None  # no checkpoint file inside the timing
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    it = Cycle(batches)

    class Loader:  # len() and iteration, like a DataLoader; continues where the last call stopped
        def __len__(self):
            return len(batches)

        def __iter__(self):
            while True:
                yield it.next()

    loader = Loader()

    def run(n):
        with distiller:  # teacher eval, student train (TextBrewer's context)
            distiller.train(opt, loader, num_steps=n)
    return run


def make_ad2ds(student, teacher, batches, temperature, lr, stage, single_rank_path=False):
    from ad2_ds import AD2Config, AD2Objective
    from ad2_ds.engine import build_engine
    from ad2_ds.teachers import LocalTeacher

    objective = AD2Objective(student.train(), AD2Config(method="kd", temperature=temperature))
    opt = torch.optim.AdamW(objective.parameters(), lr=lr)
    ds_config = {"train_micro_batch_size_per_gpu": batches[0]["input_ids"].shape[0], "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**9}
    if stage == 2:
        ds_config["zero_optimization"].update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    # single_rank_path: what recipes/distill_glue.py does with a ZeRO-1/2 config on one rank
    engine, _ = build_engine(objective, ds_config, optimizer=opt, single_rank_path=single_rank_path)
    t = LocalTeacher(teacher)
    it = Cycle(batches)

    def run(n):
        for _ in range(n):
            b = it.next()
            losses = engine(b, t(b))
            engine.backward(losses["loss"])
            engine.step()
    return run


TEACHER_DIR = "/root/.cache/ad2_ds/teachers/movie-polarity-all-MiniLM-L6-v2-n2000-len64-e3-s42"


def e2e_textbrewer(args) -> dict:
    """TextBrewer as its examples use it on movie-polarity: every example padded to max_length, a shuffled
    DataLoader, the teacher live every step, BasicDistiller's per-epoch checkpoint and an evaluation callback.
    Settings mirror the ad2-ds run: the same teacher, student = its bottom 3 layers, 2,000 training sentences
    (the recipe's fixed subset), batch 16, AdamW(1e-4, wd 0.01), linear warmup 22 steps then linear decay over
    3 epochs (DeepSpeed's WarmupDecayLR), clipping 1.0, T=1, CE + KD weights 1 and 1."""
    t_start = time.perf_counter()
    import textbrewer
    from textbrewer import DistillationConfig, TrainingConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from ad2_ds.data.glue import load_task
    from ad2_ds.modeling import student_from_teacher

    torch.manual_seed(args.seed)
    raw = load_task("movie-polarity")
    train_raw = raw["train"].shuffle(seed=0).select(range(2000))  # the recipe's fixed low-resource subset
    tok = AutoTokenizer.from_pretrained(args.teacher)

    def encode(ds):
        enc = tok(list(ds["text_a"]), padding="max_length", truncation=True, max_length=args.max_seq_length,
                  return_tensors="pt")
        return torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                                              torch.tensor(ds["label"]))

    def collate(rows):
        ids, am, tt, y = (torch.stack(x) for x in zip(*rows))
        return {"input_ids": ids, "attention_mask": am, "token_type_ids": tt, "labels": y}

    train_ds, dev_ds = encode(train_raw), encode(raw["dev"])
    loader = torch.utils.data.DataLoader(train_ds, batch_size=16, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    student = student_from_teacher(teacher, 3, "bottom").train()
    history = []

    def evaluate(model, step):
        model.eval()
        correct = 0
        with torch.no_grad():
            for b in torch.utils.data.DataLoader(dev_ds, batch_size=32, collate_fn=collate):
                y = b.pop("labels")
                correct += int((model(**b).logits.argmax(-1) == y).sum())
        history.append({"step": step, "accuracy": correct / len(dev_ds)})

    outdir = tempfile.mkdtemp(prefix="tb-e2e-")
    train_config = TrainingConfig(device="cpu", output_dir=outdir, log_dir=None)
    distill_config = DistillationConfig(temperature=1.0, kd_loss_type="ce", kd_loss_weight=1.0, hard_label_weight=1.0)
    distiller = textbrewer.BasicDistiller(train_config, distill_config, teacher, student,
                                          lambda b, o: {"logits": o.logits},
                                          lambda b, o: {"logits": o.logits, "losses": o.loss})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    total = len(loader) * args.epochs
    t_train = time.perf_counter()
    with distiller:
        distiller.train(opt, loader, num_epochs=args.epochs, scheduler_class=get_linear_schedule_with_warmup,
                        scheduler_args={"num_warmup_steps": 22, "num_training_steps": total}, max_grad_norm=1.0,
                        callback=evaluate)
    train_s = time.perf_counter() - t_train
    return {"history": history, "best_accuracy": max(h["accuracy"] for h in history),
            "last_accuracy": history[-1]["accuracy"], "train_seconds_incl_eval_and_saves": round(train_s, 1),
            "samples_per_second": round(len(train_ds) * args.epochs / train_s, 2),
            "in_process_wall_s": round(time.perf_counter() - t_start, 1)}


def e2e_ad2ds_command(args, out_dir, cache_dir):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [sys.executable, os.path.join(repo, "recipes", "distill_glue.py"),
            "--deepspeed", os.path.join(repo, "ds_configs", "zero2.json"),
            "--task", "movie-polarity", "--method", "kd",
            "--teacher", args.teacher, "--teacher_cache", cache_dir, "--output_dir", out_dir, "--no_progress",
            "--num_train_epochs", str(args.epochs), "--seed", str(args.seed), "--max_seq_length",
            str(args.max_seq_length)]


def e2e(args) -> dict:
    """Alternate fresh processes: ad2-ds's recipe (teacher cache built fresh each time, dynamic padding,
    length-grouped batches, ZeRO-2 engine) and TextBrewer (above), ``--e2e_repeats`` times each."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    runs = {"ad2ds": [], "textbrewer": []}
    for rep in range(args.e2e_repeats):
        for name in (("ad2ds", "textbrewer") if rep % 2 == 0 else ("textbrewer", "ad2ds")):
            q0 = quiet()  # checked before our own recipe process starts (it matches the pattern too)
            t0 = time.perf_counter()
            if name == "ad2ds":
                work = tempfile.mkdtemp(prefix="ad2-e2e-")
                cmd = e2e_ad2ds_command(args, os.path.join(work, "run"), os.path.join(work, "tcache"))
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"ad2-ds recipe failed ({proc.returncode}): {proc.stderr[-3000:]}")
                with open(os.path.join(work, "run", "results.json")) as f:
                    res = json.load(f)
                import re

                log = [ln for ln in proc.stderr.splitlines() if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", ln)]
                row = {"log": log, "history": res["history"], "best_accuracy": res["best"]["accuracy"],
                       "last_accuracy": res["history"][-1]["accuracy"],
                       "train_seconds": round(res["train_seconds"], 1),
                       "samples_per_second": round(res["samples_per_second"], 2),
                       "command": " ".join(cmd)}
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--e2e_worker", "--threads", str(args.threads),
                       "--epochs", str(args.epochs), "--seed", str(args.seed), "--teacher", args.teacher,
                       "--max_seq_length", str(args.max_seq_length)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"TextBrewer run failed ({proc.returncode}): {proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["command"] = " ".join(cmd)
            row["process_wall_s"] = round(wall, 1)
            row["quiet"] = q0 and quiet()
            runs[name].append(row)
            print(f"e2e {name} #{rep + 1}: wall {wall:.0f} s, best acc {row['best_accuracy']:.4f} "
                  f"(epochs {[round(h['accuracy'], 4) for h in row['history']]}), quiet {row['quiet']}", flush=True)
    speedups = [t["process_wall_s"] / a["process_wall_s"] for a, t in zip(runs["ad2ds"], runs["textbrewer"])]
    print(f"e2e wall-time speedup ad2-ds over TextBrewer: {[round(x, 2) for x in speedups]}", flush=True)
    return {"runs": runs, "speedup_wall": [round(x, 3) for x in speedups]}


def environment(threads) -> dict:
    try:
        import textbrewer

        tb = textbrewer.__version__
    except Exception as e:  # noqa: BLE001
        tb = f"not importable: {e!r}"
    return common.environment(threads, textbrewer=tb, distill_glue_processes_at_end=len(common.busy_processes()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per contender per round")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--n_batches", type=int, default=8)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--contenders", default="plain,textbrewer,textbrewer-general,ad2ds-z0,ad2ds-z2,ad2ds-1rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json_out", default=None)
    p.add_argument("--e2e", action="store_true", help="also the end-to-end movie-polarity comparison")
    p.add_argument("--e2e_only", action="store_true", help="only the end-to-end comparison")
    p.add_argument("--e2e_repeats", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--teacher", default=TEACHER_DIR, help="fine-tuned teacher for the end-to-end comparison")
    p.add_argument("--e2e_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.e2e_worker:
        import logging

        logging.getLogger("Distillation").setLevel(logging.WARNING)
        print(json.dumps(e2e_textbrewer(args)), flush=True)
        return
    if args.e2e_only:
        result = {"command": "PYTHONPATH=. python benchmarks/peer_textbrewer.py " + " ".join(
                  sys.argv[1:] if argv is None else argv), "environment": environment(args.threads), "e2e": e2e(args)}
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=1)
        return
    from ad2_ds.dist import init_distributed, setup_single_process_env

    # setup_single_process_env sets torch's thread count to cores // ranks when OMP_NUM_THREADS is unset, undoing the
    # set_num_threads above: pin both
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    setup_single_process_env()
    init_distributed()
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("Distillation").setLevel(logging.WARNING)  # TextBrewer's per-call info lines
    from transformers import BertForSequenceClassification

    torch.manual_seed(args.seed)
    student0 = BertForSequenceClassification(minilm_config(3))
    teacher = BertForSequenceClassification(minilm_config(6)).eval().requires_grad_(False)
    batches = fixed_batches(args.n_batches, args.batch_size, args.seq_len, args.seed)
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    makers = {
        "plain": lambda s: make_plain(s, teacher, batches, args.temperature, args.lr),
        "textbrewer": lambda s: make_textbrewer(s, teacher, batches, args.temperature, args.lr, general=False),
        "textbrewer-general": lambda s: make_textbrewer(s, teacher, batches, args.temperature, args.lr, general=True),
        "ad2ds-z0": lambda s: make_ad2ds(s, teacher, batches, args.temperature, args.lr, stage=0),
        "ad2ds-z2": lambda s: make_ad2ds(s, teacher, batches, args.temperature, args.lr, stage=2),
        "ad2ds-1rank": lambda s: make_ad2ds(s, teacher, batches, args.temperature, args.lr, stage=2,
                                            single_rank_path=True),
    }
    runs, errors = {}, {}
    for name in names:
        try:
            runs[name] = makers[name](copy.deepcopy(student0))
            runs[name](1)  # warm-up
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not hidden
            import traceback

            errors[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            runs.pop(name, None)
            print(f"{name}: FAILED: {errors[name]}", flush=True)
    live = list(runs)
    if torch.get_num_threads() != args.threads:
        raise RuntimeError(f"torch runs {torch.get_num_threads()} threads, not --threads {args.threads}")
    print(f"batch {args.batch_size}x{args.seq_len} fixed length, {args.threads} thread(s), T={args.temperature}; "
          f"{args.rounds} rounds x {args.steps} steps; quiet machine at start: {quiet()}", flush=True)
    per_round = {n: [] for n in live}
    quiet_rounds = []
    for r in range(args.rounds):
        order = live[r % len(live):] + live[: r % len(live)]
        q = quiet()
        for name in order:
            runs[name](1)  # untimed step after switching
            t0 = time.perf_counter()
            runs[name](args.steps)
            per_round[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        q = q and quiet()
        quiet_rounds.append(q)
        print(f"round {r + 1}/{args.rounds} (quiet {q}): " + "  ".join(
            f"{n}={per_round[n][-1]:.1f}/s" for n in live), flush=True)

    def ratio_stats(a, b):
        rs = [x / y for x, y in zip(per_round[a], per_round[b])]
        return {"min": round(min(rs), 3), "median": round(statistics.median(rs), 3), "max": round(max(rs), 3),
                "per_round": [round(x, 3) for x in rs]}

    rows = {n: {"median_samples_per_s": round(statistics.median(v), 2), "min": round(min(v), 2),
                "max": round(max(v), 2), "per_round": [round(x, 2) for x in v]} for n, v in per_round.items()}
    ratios = {}
    for a in (n for n in live if n.startswith("ad2ds")):
        for b in (n for n in live if not n.startswith("ad2ds")):
            ratios[f"{a} / {b}"] = ratio_stats(a, b)
    for b in (n for n in live if n.startswith("textbrewer")):
        if "plain" in live:
            ratios[f"{b} / plain"] = ratio_stats(b, "plain")
    print(f"\n{'contender':<20}{'median samples/s':>17}{'min':>8}{'max':>8}")
    for n, r in rows.items():
        print(f"{n:<20}{r['median_samples_per_s']:>17.1f}{r['min']:>8.1f}{r['max']:>8.1f}")
    print(f"\n{'ratio (per round)':<34}{'min':>7}{'median':>8}{'max':>7}")
    for k, v in ratios.items():
        print(f"{k:<34}{v['min']:>7.3f}{v['median']:>8.3f}{v['max']:>7.3f}")
    result = {"command": "PYTHONPATH=. python benchmarks/peer_textbrewer.py " + " ".join(
              sys.argv[1:] if argv is None else argv), "environment": environment(args.threads),
              "setup": {k: getattr(args, k) for k in ("batch_size", "seq_len", "n_batches", "temperature", "lr",
                                                      "rounds", "steps", "seed")},
              "quiet_rounds": quiet_rounds, "samples_per_s": rows, "ratios": ratios, "errors": errors,
              "e2e": e2e(args) if args.e2e else None}
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    from ad2_ds.dist import clean_exit

    sys.stdout.flush()
    clean_exit(0)


if __name__ == "__main__":
    main()
