"""The ``steps`` phase of the GPU check: per precision, one ZeRO-2 engine per method (and the plain loop), built,
measured and timed interleaved with a cached and a live teacher (see ``benchmarks/gpu_check.py``'s docstring)::

    bash benchmarks/gpu_check.sh                         # every phase; GPU_CHECK_PHASES=steps for this one alone
    python benchmarks/gpu_check.py --cpu_smoke --phases steps --out_dir /tmp/gc
"""

import copy
import os
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from gpu_check_base import DTYPES, REPO, Memory, r1, tensor_mib
from step_cost import METHODS, PassCounter, Runner, interleave, per_round_ratio_range

NAME = "steps"
CHECK_METHODS = ("kd", "ad2-dkd-k1-fast", "ad2-dkd-k1-naive", "ad2-k1-fast")
PLAIN_METHODS = ("kd", "ad2-dkd-k1-fast")
DS_JSON = {"fp16": "ds_configs/zero2_fp16.json", "bf16": "ds_configs/zero2_bf16.json", "fp32": "ds_configs/zero2.json"}


def output_tensors(out) -> list:
    return [out.logits, *(out.hidden_states or ()), *(out.attentions or ())]


def sharpen(out, dtype):
    """Random teachers give near-uniform logits: x10 so KL and its gradient are not ~0 (as step_cost does). Hidden
    states and attention maps go to the student's dtype (a cache is read in it; ``.to`` is free when it matches);
    logits stay fp32."""
    from ad2_ds import TeacherOutput

    def cast(seq):
        return None if seq is None else [None if t is None else t.to(dtype) for t in seq]

    return TeacherOutput(out.logits * 10, cast(out.hidden_states), cast(out.attentions))


def load_engine_json(precision: str, batch_size: int):
    """The shipped ZeRO-2 JSON of this precision, without its optimizer and scheduler sections, and the optimizer's
    params (for the torch AdamW passed in its place)."""
    from ad2_ds.dsconfig import load_ds_config

    cfg = load_ds_config(os.path.join(REPO, DS_JSON[precision]))
    cfg.pop("scheduler", None)  # "auto" step counts; a constant lr costs the same
    opt_params = cfg.pop("optimizer", {}).get("params", {})
    cfg.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=1,
               zero_allow_untested_optimizer=True, steps_per_print=10**9)
    return cfg, opt_params


def adamw(params, opt_params: dict) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, **{k: v for k, v in opt_params.items() if k in ("lr", "betas", "eps",
                                                                                    "weight_decay")})


@dataclass
class Case:
    """One timed configuration of a phase (a Runner) and what is measured about it besides time."""

    method: str
    teacher: str  # "cached" | "live"
    loop: str  # "engine" | "plain"
    runner: Runner
    owner: dict  # the engine or plain loop it runs on and what its build measured (shared by its cases)
    teacher_side_mib: float
    deltas: List[torch.Tensor] = field(default_factory=list)
    step_peak_mib: Optional[float] = None

    @property
    def name(self) -> str:
        return f"{self.method}/{self.teacher}/{self.loop}"

    def record(self, losses) -> None:
        if "delta_applied" in losses:
            self.deltas.append(losses["delta_applied"].detach())


class Phase:
    """One precision: the engines and plain loop, built and measured, then timed interleaved."""

    def __init__(self, args, precision: str, ctx: dict, log: Callable[[str], None]):
        self.args, self.precision, self.ctx, self.log = args, precision, ctx, log
        self.dtype = DTYPES[precision]
        self.mem: Memory = ctx["mem"]
        self.ds_json, self.opt_params = load_engine_json(precision, args.batch_size)
        self.cases: List[Case] = []
        self.engines = []

    def cfg(self, method: str):
        from ad2_ds import AD2Config

        kwargs = dict(METHODS[method][0])
        if AD2Config(**kwargs).adversarial:
            kwargs.update(epsilon=self.args.epsilon, step_size=self.args.step_size or self.args.epsilon)
        return AD2Config(**kwargs)

    def _warm(self, step, took_step, what: str) -> int:
        """Steps until the optimizer really stepped (a skipped fp16 step creates no Adam state)."""
        for n in range(1, self.args.max_warm + 1):
            step()
            if took_step():
                return n
        self.log(f"  {what}: no optimizer step taken in {n} warm-up steps (fp16 overflow?); static memory lacks it")
        return n

    def _live_fn(self, deep: bool):
        teacher, batch, dtype = self.ctx["teacher"], self.ctx["batch"], self.dtype

        def fn():
            # one teacher engine serves every row: a logits-only row must not pay for hidden states and maps
            teacher.output_hidden_states = teacher.output_attentions = deep
            return sharpen(teacher(batch), dtype)

        return fn

    def build_plain(self, methods, cached, cached_mib) -> None:
        """One student and one optimizer for the plain loop's methods (as in step_cost), autocast to the phase
        dtype."""
        from ad2_ds import AD2Objective

        mem, ctx, dtype, batch = self.mem, self.ctx, self.dtype, self.ctx["batch"]
        device = ctx["device"]
        mem.empty_cache()
        base, base_reserved = mem.allocated(), mem.reserved()
        mem.reset_peak()
        student = copy.deepcopy(ctx["student"]).to(device).train()
        optimizer = adamw(student.parameters(), self.opt_params)
        scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        clip = self.ds_json.get("gradient_clipping", 0.0)
        autocast = self.precision != "fp32"
        owner = {"scaler": scaler}
        for m in methods:
            objective = AD2Objective(student, self.cfg(m), teacher_config=ctx["teacher_config"])
            deep = self.cfg(m).deep_kd
            case = Case(m, "cached", "plain", None, owner, cached_mib[deep])

            def step(objective=objective, out_t=cached[deep], case=case):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    losses = objective(batch, out_t)
                if scaler is not None:
                    scaler.scale(losses["loss"]).backward()
                    scaler.unscale_(optimizer)
                else:
                    losses["loss"].backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                case.record(losses)
                mem.sync()

            case.runner = Runner(case.name, step)
            self.cases.append(case)
        counter = PassCounter(student)  # after every objective's tap (see PassCounter)
        for c in self.cases[-len(methods):]:
            c.runner.counter = counter
        owner["warm_steps"] = self._warm(self.cases[-len(methods)].runner.step, lambda: len(optimizer.state) > 0,
                                         "plain loop")
        mem.sync()
        owner.update(
            static_mib=r1(mem.allocated() - base), build_peak_mib=r1(mem.peak() - base),
            build_reserved_mib=r1(mem.reserved() - base_reserved) if base_reserved is not None else None,
        )

    def build_engine(self, method: str, cached, cached_mib) -> None:
        from ad2_ds import AD2Objective
        from ad2_ds.engine import build_engine

        mem, ctx = self.mem, self.ctx
        mem.empty_cache()
        base, base_reserved = mem.allocated(), mem.reserved()
        mem.reset_peak()
        t0 = time.perf_counter()
        student = copy.deepcopy(ctx["student"]).train()
        objective = AD2Objective(student, self.cfg(method), teacher_config=ctx["teacher_config"])
        optimizer = adamw(objective.parameters(), self.opt_params)
        engine, _ = build_engine(objective, copy.deepcopy(self.ds_json), optimizer=optimizer, single_rank_path=False)
        self.engines.append(engine)
        counter = PassCounter(student)  # after the objective's tap (see PassCounter)
        owner = {"engine": engine}
        deep = self.cfg(method).deep_kd
        batch = ctx["batch"]
        for source in ("cached", "live"):
            case = Case(method, source, "engine", None, owner,
                        cached_mib[deep] if source == "cached" else ctx["teacher_weights_mib"])
            t_fn = (lambda out_t=cached[deep]: out_t) if source == "cached" else self._live_fn(deep)

            def step(t_fn=t_fn, case=case):
                losses = engine(batch, t_fn())
                engine.backward(losses["loss"])
                engine.step()
                case.record(losses)
                mem.sync()

            case.runner = Runner(case.name, step, counter)
            self.cases.append(case)
        took_step = lambda: engine.global_steps > engine.skipped_steps
        owner["warm_steps"] = self._warm(self.cases[-2].runner.step, took_step, method)
        self.cases[-1].runner.step()  # the live row's first step inside the build's peak too
        mem.sync()
        owner.update(
            static_mib=r1(mem.allocated() - base), build_peak_mib=r1(mem.peak() - base),
            build_reserved_mib=r1(mem.reserved() - base_reserved) if base_reserved is not None else None,
            build_s=round(time.perf_counter() - t0, 2),
        )
        self.log(f"  {self.precision} {method}: engine built and warm in {owner['build_s']} s, static "
                 f"{owner['static_mib']} MiB, build peak +{owner['build_peak_mib']} MiB")

    def run(self) -> dict:
        args, mem = self.args, self.mem
        t0 = time.perf_counter()
        mem.track(self.precision)
        cached = {deep: sharpen(out, self.dtype) for deep, out in self.ctx["cached_raw"].items()}
        cached_mib = {deep: tensor_mib(output_tensors(out)) for deep, out in cached.items()}
        plain = [m for m in PLAIN_METHODS if m in args.methods]
        if plain and not args.no_plain:
            self.build_plain(plain, cached, cached_mib)
        for m in args.methods:
            self.build_engine(m, cached, cached_mib)
        runners = [c.runner for c in self.cases]
        self.log(f"{self.precision}: {len(runners)} runners interleaved, {args.rounds} rounds x {args.steps} steps")
        interleave(runners, args.rounds, args.steps, args.warmup, log=self.log)
        for c in self.cases:  # memory of one more step each, now that nothing is lazily allocated any more
            mem.sync()
            before = mem.allocated()
            mem.reset_peak()
            c.runner.step()
            c.step_peak_mib = r1(mem.peak() - before)
        result = self.summarise(cached_mib)
        result["memory_mib"] = mem.high(self.precision)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        for engine in self.engines:
            engine.destroy()
        self.cases.clear()
        self.engines.clear()
        return result

    def summarise(self, cached_mib) -> dict:
        cases = self.cases
        refs = {(c.loop, c.teacher): c.runner for c in cases if c.method == "kd"}
        rows = []
        for c in cases:
            r, ref = c.runner, refs.get((c.loop, c.teacher))
            lo, hi = per_round_ratio_range(r, ref) if ref else (None, None)
            static = c.owner.get("static_mib")
            alone = None if None in (static, c.step_peak_mib) else r1(static + c.step_peak_mib + c.teacher_side_mib)
            deltas = [float(d) for d in c.deltas]
            config = self.cfg(c.method).to_dict()
            rows.append({
                "name": c.name, "method": c.method, "teacher": c.teacher, "loop": c.loop, "precision": self.precision,
                "config": {k: config[k] for k in ("method", "epsilon", "step_size", "pga_steps", "fast_pga", "w_kd",
                                                  "alpha", "w_hidden", "w_attention")},
                "median_ms": round(r.median_ms, 2),
                "samples_per_s": round(self.ctx["global_batch"] / (r.median_ms / 1e3), 1),
                "ratio_to_kd": round(r.median_ms / ref.median_ms, 3) if ref else None,
                "per_round_ratio_min": None if lo is None else round(lo, 3),
                "per_round_ratio_max": None if hi is None else round(hi, 3),
                "passes": r.passes,
                "delta_applied": round(statistics.median(deltas), 4) if deltas else None,
                "memory_mib": {
                    "static": static, "step_peak": c.step_peak_mib, "teacher_side": r1(c.teacher_side_mib),
                    "alone_estimate": alone, "build_peak": c.owner.get("build_peak_mib"),
                    "build_reserved": c.owner.get("build_reserved_mib"),
                },
                "times_ms": [round(t, 2) for t in r.times_ms],
            })
        by_name = {c.name: c for c in cases}
        vs_plain = []
        for m in PLAIN_METHODS:
            pl, en = by_name.get(f"{m}/cached/plain"), by_name.get(f"{m}/cached/engine")
            if pl is None or en is None:
                continue
            lo, hi = per_round_ratio_range(en.runner, pl.runner)
            vs_plain.append({
                "method": m, "plain_ms": round(pl.runner.median_ms, 2), "engine_ms": round(en.runner.median_ms, 2),
                "engine_over_plain": round(en.runner.median_ms / pl.runner.median_ms, 3),
                "per_round_min": round(lo, 3), "per_round_max": round(hi, 3),
                "static_mib_plain": pl.owner.get("static_mib"), "static_mib_engine": en.owner.get("static_mib"),
            })
        states = {}
        for c in cases:
            if c.loop == "engine" and c.method not in states:
                e = c.owner["engine"]
                scale = getattr(e.optimizer, "loss_scale", None)
                states[c.method] = {
                    "global_steps": e.global_steps, "skipped_steps": e.skipped_steps,
                    "loss_scale": None if scale is None else float(scale), "warm_steps": c.owner["warm_steps"],
                    "build_s": c.owner["build_s"], "zero_stage": e.zero_optimization_stage(),
                    "fp16": e.fp16_enabled(), "bf16": e.bfloat16_enabled(),
                }
            elif c.loop == "plain" and "plain" not in states:
                scaler = c.owner["scaler"]
                states["plain"] = {"warm_steps": c.owner["warm_steps"],
                                   "grad_scaler_scale": scaler.get_scale() if scaler is not None else None}
        return {
            "precision": self.precision,
            "ds_json": f"{DS_JSON[self.precision]} without optimizer and scheduler; torch.optim.AdamW with its params",
            "ds_config": self.ds_json, "optimizer_params": self.opt_params,
            "results": rows, "engine_vs_plain": vs_plain, "engines": states,
            "cached_outputs_mib": {"logits_only": r1(cached_mib[False]), "deep": r1(cached_mib[True])},
        }


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_phase(phase: dict, log) -> None:
    log(f"\n{phase['precision']}: median ms per optimizer step (x kd: same loop and teacher), memory MiB")
    log(f"{'row':<32} {'units':>5} {'ms/step':>8} {'samples/s':>9} {'x kd':>5} {'per-round':>11} {'static':>7} "
        f"{'step pk':>7} {'teacher':>7} {'alone':>7} {'δ kept':>6}")
    for r in phase["results"]:
        m = r["memory_mib"]
        per_round = "" if r["per_round_ratio_min"] is None else \
            f"{r['per_round_ratio_min']:.2f}-{r['per_round_ratio_max']:.2f}"
        delta = "" if r["delta_applied"] is None else f"{r['delta_applied']:.2f}"
        log(f"{r['name']:<32} {r['passes']['units']:>5} {r['median_ms']:>8.1f} {r['samples_per_s']:>9.0f} "
            f"{fmt(r['ratio_to_kd'], '.2f'):>5} {per_round:>11} {fmt(m['static'], '.0f'):>7} "
            f"{fmt(m['step_peak'], '.0f'):>7} {fmt(m['teacher_side'], '.0f'):>7} {fmt(m['alone_estimate'], '.0f'):>7} "
            f"{delta:>6}")
    for v in phase["engine_vs_plain"]:
        log(f"engine/plain {v['method']:<16} {v['engine_ms']:.1f} / {v['plain_ms']:.1f} ms = "
            f"{v['engine_over_plain']:.3f} (per round {v['per_round_min']:.3f}-{v['per_round_max']:.3f})")
    log(f"phase peaks: {phase['memory_mib']}; engines: {phase['engines']}")


def forget(result: dict) -> None:
    """Drop what an earlier run of this phase wrote into ``result`` (it is about to be run again)."""
    result["phases"] = {}
    for key in ("errors", "skipped_phases"):
        kept = [k for k in result[key] if k not in DTYPES]
        result[key] = {k: result[key][k] for k in kept} if isinstance(result[key], dict) else kept


def run(args, ctx: dict, result: dict, write: Callable[[], None], over_budget: Callable[[], bool]) -> None:
    """Each of ``args.precisions`` in turn into ``result["phases"]``; one that raises is recorded under
    ``result["errors"]`` (its traceback) and the next still runs; ``write()`` after each."""
    log = ctx["log"]
    for precision in args.precisions:
        if over_budget():
            log(f"{precision}: skipped, {args.budget_s:.0f} s budget spent")
            result["skipped_phases"].append(precision)
            continue
        try:
            phase = Phase(args, precision, ctx, log).run()
        except Exception:  # noqa: BLE001 - keep the other precision's figures; the exit code still says it failed
            result["errors"][precision] = traceback.format_exc()
            log(f"{precision}: FAILED\n{result['errors'][precision]}")
            write()
            continue
        result["phases"][precision] = phase
        write()
        print_phase(phase, log)
