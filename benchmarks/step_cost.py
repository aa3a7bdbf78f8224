"""Wall time per optimizer step of the AD2 objective, per method, on one machine; ratios to vanilla KD.

    PYTHONPATH=. python benchmarks/step_cost.py --rounds 5 --steps 3 --json_out docs/results/step_cost.json
    PYTHONPATH=. python benchmarks/step_cost.py --methods kd,ad2-dkd-k1-fast --deepspeed
    PYTHONPATH=. python benchmarks/step_cost.py --methods kd,ad2-dkd-k1-fast,ad2-clean-grad,ad2-free \
        --deepspeed --zero3 --json_out docs/results/step_cost_ascents.json

One random-weight student (BERT shaped like a 3-layer MiniLM) and one batch serve every method. A teacher of the
same shape with 6 layers (all-MiniLM-L6-v2) is either *cached* (its outputs computed once and held in memory as a
TeacherOutput, so only the student's work is timed) or *live* (teacher forward inside the timed step). A step is
``zero_grad; objective(batch, teacher_output); loss.backward(); AdamW.step()`` in train mode (dropout on), fp32.

Methods are interleaved round-robin (the start rotates each round) after an untimed warm-up round, so machine noise
hits all of them alike; a method's time is the median over all its timed steps, and its ratio is that median over
kd's (cached teacher). Passes are counted with hooks, not assumed: student forwards (a forward pre-hook), and
backward traversals of each forward graph (a tensor hook on the embedding output), split into full backwards (the
gradient also reaches the word-embedding lookup, i.e. parameter gradients) and input-only ones (the ascent's).
Units: forward 1, full backward 2, input-only backward 1.

``--deepspeed`` adds a second phase: kd, AD2 fast K=1 and the two cheaper ascents (cached teacher; those of
``--methods``) in a single-rank DeepSpeed engine (ZeRO-2, torch AdamW, no JIT-compiled op) interleaved with the same
plain loop, to show what the engine adds. ``--zero3`` adds a third: the same methods in a single-rank ZeRO-3 engine,
passes counted and steps timed among themselves (ratios over kd's ZeRO-3 step). There the kl ascent takes its naive
path (one forward more: ``AD2Objective.zero3_partitioned``) and ascent clean_grad is refused (recorded with its
message): ZeRO-3's partitioned weights cannot be differentiated by parameter before the engine's backward.

``ad2-clean-grad`` and ``ad2-free`` are ``--method ad2`` with ``--ascent clean_grad`` / ``free`` (ad2_ds/ascent.py);
``ad2-dkd-k1-fast`` is today's default ``--method ad2`` (``ad2-dkd`` is its other name; ε = η = 1, K = 1, fast path).
``ad2-free`` replays one batch, so from its second step on it starts from that batch's stored δ (as a later epoch
would); its passes are those of every step.
"""
import argparse
import copy
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ad2_ds import AD2Config, AD2Objective, TeacherOutput
from ad2_ds.ascent import attach_delta_store
from ad2_ds.modeling import find_embedding_module

import common

# name -> (AD2Config kwargs, teacher: "none" | "cached" | "live")
METHODS = {
    "finetune": (dict(method="finetune"), "none"),
    "kd": (dict(method="kd"), "cached"),
    "pkd": (dict(method="pkd"), "cached"),
    "ad2-dkd-k1-fast": (dict(method="ad2-dkd", pga_steps=1), "cached"),
    "ad2-clean-grad": (dict(method="ad2", ascent="clean_grad"), "cached"),  # δ from the clean backward
    "ad2-free": (dict(method="ad2", ascent="free"), "cached"),  # δ per example, carried over (ad2_ds/ascent.py)
    "ad2-dkd-k1-naive": (dict(method="ad2-dkd", pga_steps=1, fast_pga=False), "cached"),
    "ad2-dkd-k2": (dict(method="ad2-dkd", pga_steps=2), "cached"),
    "ad2-dkd-k3": (dict(method="ad2-dkd", pga_steps=3), "cached"),
    "ad2-k1-fast": (dict(method="ad2-paper", pga_steps=1), "cached"),  # AD2 with deep KD (the paper's terms)
    "ad2-dkd-eps0": (dict(method="ad2-dkd", epsilon=0.0), "cached"),
    "ad2-dkd-random": (dict(method="ad2-dkd", epsilon=1.0, step_size=1.0, random_direction=True), "cached"),
    "ad2-dkd-tokl2-rel": (
        dict(method="ad2-dkd", perturb_norm="token-l2", perturb_size="relative", epsilon=0.05, step_size=0.05),
        "cached",
    ),
    "ad2-dkd-preln": (dict(method="ad2-dkd", perturb_place="pre-ln", epsilon=1.0, step_size=1.0), "cached"),
    "ad2-smart-dkd": (dict(method="ad2-smart", w_hidden=0.0, w_attention=0.0), "cached"),
    "kd-live": (dict(method="kd"), "live"),
    "ad2-dkd-k1-fast-live": (dict(method="ad2-dkd", pga_steps=1), "live"),
}
REFERENCE = "kd"


def minilm_config(layers: int):
    from transformers import BertConfig

    # all-MiniLM-L6-v2's shape; eager attention for every method, since ad2's attention KD needs the maps
    return BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512, num_labels=2, attn_implementation="eager",
    )


def make_batch(batch_size: int, seq_len: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random token ids, right-padded to lengths in [seq_len/2, seq_len] like a real padded batch."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 30522, (batch_size, seq_len), generator=g)
    input_ids[:, 0] = 101  # [CLS]
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=g)
    lengths[0] = seq_len
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
        "idx": torch.arange(batch_size),  # ascent free's δ store is keyed by it
    }


def teacher_forward(teacher, batch, deep: bool) -> TeacherOutput:
    with torch.no_grad():
        o = teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"], output_hidden_states=deep, output_attentions=deep,
        )
    # random teachers give near-uniform logits; sharpen them so KL and its gradient are not ~0
    return TeacherOutput(o.logits * 10, o.hidden_states if deep else None, o.attentions if deep else None)


class PassCounter:
    """Counts student forwards and backward traversals per forward graph (see the module docstring).

    Register after every AD2Objective on the student: forward hooks run in registration order, so this one sees the
    embedding output with δ already added (the naive ascent differentiates with respect to δ through that sum).
    """

    def __init__(self, student):
        self.forwards = self.backwards = self.full_backwards = 0
        emb = find_embedding_module(student)
        self._handles = [
            student.register_forward_pre_hook(self._on_forward),
            emb.register_forward_hook(lambda m, i, out: self._watch(out, "backwards")),
            emb.word_embeddings.register_forward_hook(lambda m, i, out: self._watch(out, "full_backwards")),
        ]

    def _on_forward(self, *_):
        self.forwards += 1

    def _watch(self, out, counter):
        if out.requires_grad:
            out.register_hook(lambda g: setattr(self, counter, getattr(self, counter) + 1))

    def reset(self):
        self.forwards = self.backwards = self.full_backwards = 0

    def snapshot(self) -> Dict[str, int]:
        full, input_only = self.full_backwards, self.backwards - self.full_backwards
        return {"forward": self.forwards, "backward_full": full, "backward_input_only": input_only,
                "units": self.forwards + 2 * full + input_only}


@dataclass
class Runner:
    """One timed configuration: a step closure and the times it took."""

    name: str
    step: Callable[[], None]
    counter: Optional[PassCounter] = None
    times_ms: List[float] = field(default_factory=list)
    round_medians: List[float] = field(default_factory=list)
    passes: Optional[Dict[str, int]] = None

    def run(self, n: int, timed: bool) -> List[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.step()
            out.append((time.perf_counter() - t0) * 1e3)
        if timed:
            self.times_ms += out
            self.round_medians.append(statistics.median(out))
        return out

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def plain_step(objective, optimizer, batch, teacher_output_fn):
    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = objective(batch, teacher_output_fn())
        losses["loss"].backward()
        optimizer.step()

    return step


def engine_step(engine, batch, teacher_output_fn):
    def step():
        losses = engine(batch, teacher_output_fn())
        engine.backward(losses["loss"])
        engine.step()

    return step


class PhaseTimer:
    """Splits one plain step of an objective into phases by timing the calls it makes (CPU ops are synchronous).

    fwd_clean / fwd_ascent / fwd_adv: the student forwards (the ascent's are those inside ``perturbation``);
    grad_ascent: ``torch.autograd.grad`` calls (input-only backwards); perturb_other: the rest of ``perturbation``
    (δ arithmetic: norms, projection); losses_other: the rest of the objective's forward (loss terms);
    backward: ``loss.backward()``; optimizer: ``AdamW.step()``.
    """

    def __init__(self, objective, optimizer, batch, teacher_output_fn):
        self.objective, self.optimizer, self.batch, self.t_fn = objective, optimizer, batch, teacher_output_fn
        self.ms: Dict[str, List[float]] = {}
        self._in_perturbation = False

    def _wrap(self, fn, phase_fn):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._cur[phase_fn()] = self._cur.get(phase_fn(), 0.0) + (time.perf_counter() - t0) * 1e3
        return wrapped

    def step(self) -> Dict[str, float]:
        obj, self._cur = self.objective, {}
        run, perturbation, grad = obj._run, obj.perturbation, torch.autograd.grad
        seen_perturbation = []

        def run_phase():
            return "fwd_ascent" if self._in_perturbation else ("fwd_adv" if seen_perturbation else "fwd_clean")

        def perturb(*a, **kw):
            self._in_perturbation = True
            t0 = time.perf_counter()
            try:
                return perturbation(*a, **kw)
            finally:
                self._in_perturbation = False
                seen_perturbation.append(1)
                self._cur["_perturbation"] = (time.perf_counter() - t0) * 1e3

        obj._run = self._wrap(run, run_phase)
        obj.perturbation = perturb
        torch.autograd.grad = self._wrap(grad, lambda: "grad_ascent")
        try:
            self.optimizer.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            losses = obj(self.batch, self.t_fn())
            total_fwd = (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            losses["loss"].backward()
            t2 = time.perf_counter()
            self.optimizer.step()
            t3 = time.perf_counter()
        finally:
            del obj._run, obj.perturbation
            torch.autograd.grad = grad
        cur = self._cur
        p_total = cur.pop("_perturbation", 0.0)
        cur["perturb_other"] = p_total - cur.get("fwd_ascent", 0.0) - cur.get("grad_ascent", 0.0) if p_total else 0.0
        cur["losses_other"] = total_fwd - sum(cur.values())
        cur["backward"], cur["optimizer"] = (t2 - t1) * 1e3, (t3 - t2) * 1e3
        cur["total"] = (t3 - t0) * 1e3
        for k, v in cur.items():
            self.ms.setdefault(k, []).append(v)
        return cur


PHASES = ("fwd_clean", "grad_ascent", "fwd_ascent", "perturb_other", "fwd_adv", "losses_other", "backward",
          "optimizer", "total")


def breakdown(objectives, optimizer, batch, rounds: int) -> Dict[str, Dict[str, float]]:
    """Median ms per phase for each (name -> (objective, teacher_output_fn)), interleaved like the main table."""
    timers = {n: PhaseTimer(o, optimizer, batch, t_fn) for n, (o, t_fn) in objectives.items()}
    for t in timers.values():
        t.step()  # warm-up
        t.ms.clear()
    for _ in range(rounds):
        for t in timers.values():
            t.step()
    out = {n: {k: round(statistics.median(t.ms[k]), 1) for k in PHASES if k in t.ms} for n, t in timers.items()}
    names = list(out)
    print("\nPhase breakdown, median ms (" + ", ".join(names) + "):")
    for k in PHASES:
        print(f"  {k:<14}" + "".join(f"{out[n].get(k, 0.0):>10.0f}" for n in names))
    return out


def count_passes(runner: Runner) -> None:
    runner.counter.reset()
    runner.step()
    runner.passes = runner.counter.snapshot()


def interleave(runners: List[Runner], rounds: int, steps: int, warmup: int, log=print) -> None:
    """Warm-up round (untimed, also counts passes), then ``rounds`` rotated round-robin rounds of ``steps`` steps."""
    for r in runners:
        r.run(warmup, timed=False)
        if r.counter is not None:
            count_passes(r)
    for i in range(rounds):
        order = runners[i % len(runners):] + runners[: i % len(runners)]
        t0 = time.perf_counter()
        for r in order:
            r.run(1, timed=False)  # one untimed step after switching method: caches and allocator settle
            r.run(steps, timed=True)
        log(f"round {i + 1}/{rounds}: {time.perf_counter() - t0:.1f} s  "
            + "  ".join(f"{r.name}={r.round_medians[-1]:.0f}" for r in runners))


def per_round_ratio_range(runner: Runner, ref: Runner):
    ratios = [a / b for a, b in zip(runner.round_medians, ref.round_medians)]
    return min(ratios), max(ratios)


def init_single_rank_deepspeed():
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no JIT compile of the shm op on one rank
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def environment() -> Dict[str, str]:
    return common.environment(threads=torch.get_num_threads())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method before the first round")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--deepspeed", action="store_true",
                   help="also time kd, ad2-dkd fast K=1 and the cheaper ascents in a ZeRO-2 engine")
    p.add_argument("--zero3", action="store_true",
                   help="also count and time kd, ad2-dkd fast K=1 and the cheaper ascents in a ZeRO-3 engine")
    p.add_argument("--ds_rounds", type=int, default=None,
                   help="rounds of the DeepSpeed and ZeRO-3 phases (default: --rounds)")
    p.add_argument("--breakdown", default="",
                   help="comma-separated methods whose steps are also split into phases (e.g. kd,ad2-dkd-k1-fast)")
    p.add_argument("--breakdown_rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json_out", default=None)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.breakdown = [m.strip() for m in args.breakdown.split(",") if m.strip()]
    unknown = [m for m in args.methods + args.breakdown if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if REFERENCE not in args.methods:
        args.methods.insert(0, REFERENCE)  # every ratio is to kd
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import BertForSequenceClassification

    torch.manual_seed(args.seed)
    student = BertForSequenceClassification(minilm_config(3)).train()  # dropout on
    initial_student = copy.deepcopy(student)
    teacher = BertForSequenceClassification(minilm_config(6)).eval()
    batch = make_batch(args.batch_size, args.seq_len, args.seed)
    cached = teacher_forward(teacher, batch, deep=True)  # computed once, held in memory
    logits_only = TeacherOutput(cached.logits)

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)  # shared: the same student for every method
    runners, objectives = [], {}
    for name in dict.fromkeys(args.methods + args.breakdown):
        kwargs, source = METHODS[name]
        cfg = AD2Config(**kwargs)
        objective = AD2Objective(student, cfg, teacher_config=teacher.config)
        attach_delta_store(objective, batch)  # ascent free's δ store, as the recipe attaches it
        if source == "none":
            t_fn = lambda: None  # noqa: E731
        elif source == "cached":
            t_fn = (lambda: cached) if cfg.deep_kd or cfg.w_pkd > 0 else (lambda: logits_only)
        else:
            deep = cfg.deep_kd or cfg.w_pkd > 0
            t_fn = lambda deep=deep: teacher_forward(teacher, batch, deep)  # noqa: E731
        runners.append(Runner(name, plain_step(objective, optimizer, batch, t_fn)))
        objectives[name] = (objective, t_fn)
    counter = PassCounter(student)  # after every objective's tap (see PassCounter)
    for r in runners:
        r.counter = counter
    runners = [r for r in runners if r.name in args.methods]

    print(f"student 3x384 ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params), teacher 6x384, "
          f"batch {args.batch_size}x{args.seq_len}, fp32, {args.threads} threads; "
          f"{args.rounds} rounds x {args.steps} steps", flush=True)
    t_start = time.perf_counter()
    interleave(runners, args.rounds, args.steps, args.warmup, log=lambda s: print(s, flush=True))
    ref = next(r for r in runners if r.name == REFERENCE)

    rows = []
    print(f"\n{'method':<22} {'fwd':>3} {'bwd full':>8} {'bwd in':>6} {'units':>5} {'ms/step':>9} "
          f"{'x kd':>6}  per-round x kd")
    for r in runners:
        p = r.passes
        lo, hi = per_round_ratio_range(r, ref)
        ratio = r.median_ms / ref.median_ms
        rows.append({"method": r.name, "passes": p, "median_ms": round(r.median_ms, 1), "ratio_to_kd": round(ratio, 3),
                     "per_round_ratio_min": round(lo, 3), "per_round_ratio_max": round(hi, 3),
                     "times_ms": [round(t, 1) for t in r.times_ms]})
        print(f"{r.name:<22} {p['forward']:>3} {p['backward_full']:>8} {p['backward_input_only']:>6} "
              f"{p['units']:>5} {r.median_ms:>9.0f} {ratio:>6.2f}  [{lo:.2f}, {hi:.2f}]")

    phases = None
    if args.breakdown:
        phases = breakdown({n: objectives[n] for n in args.breakdown}, optimizer, batch, args.breakdown_rounds)
    ds_rows = None
    if args.deepspeed:
        ds_rows = deepspeed_phase(args, initial_student, teacher.config, batch, logits_only,
                                  {r.name: r for r in runners})
    z3_rows = None
    if args.zero3:
        z3_rows = zero3_phase(args, initial_student, teacher.config, batch, logits_only, [r.name for r in runners])
    result = {
        "command": "PYTHONPATH=. python benchmarks/step_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "setup": {"student": "BERT 3 layers, hidden 384, 12 heads, FFN 1536, vocab 30522, random weights",
                  "teacher": "BERT 6 layers (all-MiniLM-L6-v2 shape), random weights, logits x10",
                  "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": "fp32", "attention": "eager",
                  "optimizer": "torch.optim.AdamW (foreach default)", "train_mode": True,
                  "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                  "methods": {n: {"config": METHODS[n][0], "teacher": METHODS[n][1]} for n in args.methods}},
        "results": rows,
        "phases_ms": phases,
        "deepspeed": ds_rows,
        "zero3": z3_rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    final = {r["method"]: r["ratio_to_kd"] for r in rows}
    if ds_rows:
        final.update({f"engine/plain {r['method']}": r["engine_over_plain"] for r in ds_rows})
    if z3_rows:
        final.update({f"zero3 {r['method']}": r.get("zero3_over_kd", "refused") for r in z3_rows})
    print(json.dumps({"ratio_to_kd": final}))
    if args.deepspeed or args.zero3:  # gloo's worker threads can abort at interpreter exit (shared notes): leave hard
        import torch.distributed as dist

        sys.stdout.flush()
        dist.destroy_process_group()
        os._exit(0)
    return result


def deepspeed_phase(args, initial_student, teacher_config, batch, logits_only, plain: Dict[str, Runner]):
    """kd, ad2-dkd fast K=1 and the cheaper ascents, cached teacher: a single-rank ZeRO-2 engine against the plain
    loop, interleaved."""
    from ad2_ds.engine import build_engine

    init_single_rank_deepspeed()
    ds_config = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**9}
    runners = []
    for name in ("kd", "ad2-dkd-k1-fast", "ad2-clean-grad", "ad2-free"):
        if name not in plain:
            continue
        student = copy.deepcopy(initial_student).train()
        objective = AD2Objective(student, AD2Config(**METHODS[name][0]), teacher_config=teacher_config)
        attach_delta_store(objective, batch)  # ascent free's δ store, as the recipe attaches it
        opt = torch.optim.AdamW(objective.parameters(), lr=1e-5)
        engine, _ = build_engine(objective, ds_config, optimizer=opt, single_rank_path=False)  # exactly this JSON
        eng = Runner(f"{name} [engine]", engine_step(engine, batch, lambda: logits_only), PassCounter(student))
        pl = Runner(name, plain[name].step, plain[name].counter)
        runners += [pl, eng]
    print("\nDeepSpeed phase (single rank, ZeRO-2, torch AdamW):", flush=True)
    interleave(runners, args.ds_rounds or args.rounds, args.steps, args.warmup, log=lambda s: print(s, flush=True))
    rows = []
    for pl, eng in zip(runners[::2], runners[1::2]):
        ratio = eng.median_ms / pl.median_ms
        lo, hi = per_round_ratio_range(eng, pl)
        rows.append({"method": pl.name, "plain_ms": round(pl.median_ms, 1), "engine_ms": round(eng.median_ms, 1),
                     "engine_over_plain": round(ratio, 3), "per_round_min": round(lo, 3),
                     "per_round_max": round(hi, 3),
                     "passes_plain": pl.passes, "passes_engine": eng.passes})
        print(f"{pl.name:<22} plain {pl.median_ms:>7.0f} ms  engine {eng.median_ms:>7.0f} ms  "
              f"engine/plain {ratio:.3f} [{lo:.3f}, {hi:.3f}]  passes {pl.passes['units']} / {eng.passes['units']}")
    for row in rows[1:]:
        if rows[0]["method"] != REFERENCE:
            break
        row["plain_over_kd"] = round(row["plain_ms"] / rows[0]["plain_ms"], 3)
        row["engine_over_kd"] = round(row["engine_ms"] / rows[0]["engine_ms"], 3)
        print(f"{row['method']} / kd: plain {row['plain_over_kd']:.2f}, engine {row['engine_over_kd']:.2f}")
    return rows


def zero3_phase(args, initial_student, teacher_config, batch, logits_only, names) -> List[dict]:
    """The same methods (those of kd, ad2-dkd fast K=1 and the cheaper ascents in ``names``) in a single-rank ZeRO-3
    engine, cached teacher: passes counted, ms per step interleaved among themselves, ratios over kd's ZeRO-3 step.
    A method the objective refuses under ZeRO-3 (ascent clean_grad) is recorded with its message."""
    from ad2_ds.engine import build_engine

    init_single_rank_deepspeed()
    ds_config = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**9}
    runners, refused = [], {}
    for name in ("kd", "ad2-dkd-k1-fast", "ad2-clean-grad", "ad2-free"):
        if name not in names:
            continue
        student = copy.deepcopy(initial_student).train()
        objective = AD2Objective(student, AD2Config(**METHODS[name][0]), teacher_config=teacher_config)
        attach_delta_store(objective, batch)
        opt = torch.optim.AdamW(objective.parameters(), lr=1e-5)
        engine, _ = build_engine(objective, ds_config, optimizer=opt, single_rank_path=False)
        runner = Runner(f"{name} [zero3]", engine_step(engine, batch, lambda: logits_only), PassCounter(student))
        try:
            runner.step()  # a refusal comes on the first step, before any gradient
        except ValueError as e:
            refused[name] = str(e)
            continue
        runners.append(runner)
    print("\nZeRO-3 phase (single rank, torch AdamW):", flush=True)
    interleave(runners, args.ds_rounds or args.rounds, args.steps, args.warmup, log=lambda s: print(s, flush=True))
    ref = runners[0] if runners and runners[0].name.startswith(REFERENCE + " ") else None
    rows = []
    for r in runners:
        row = {"method": r.name.split(" ")[0], "zero3_ms": round(r.median_ms, 1), "passes": r.passes}
        if ref is not None:
            row["zero3_over_kd"] = round(r.median_ms / ref.median_ms, 3)
            row["per_round_min"], row["per_round_max"] = (round(x, 3) for x in per_round_ratio_range(r, ref))
        rows.append(row)
        print(f"{r.name:<24} {r.median_ms:>7.0f} ms  units {r.passes['units']}  x kd {row.get('zero3_over_kd')}")
    for name, message in refused.items():
        rows.append({"method": name, "refused": message})
        print(f"{name + ' [zero3]':<24} refused: {message}")
    return rows


if __name__ == "__main__":
    main()
