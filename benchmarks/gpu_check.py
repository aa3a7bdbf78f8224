"""The GPU figures in one short run: AD2's step cost and memory under DeepSpeed on one lent GPU (issue 6).

    bash benchmarks/gpu_check.sh                                    # on the GPU machine; writes $OUT/gpu_check.json
    PYTHONPATH=. python benchmarks/gpu_check.py --cpu_smoke --out_dir /tmp/gc   # the same path on CPU, tiny models

What runs: a BERT-large-shaped teacher (24 x 1024, 16 heads, FFN 4096, vocab 30522, random weights, 2 labels,
eager attention since ad2's attention KD needs its maps) wrapped in ``DeepSpeedTeacher`` (``init_inference``, AutoTP,
tp_size = world size, i.e. 1 on the one lent GPU) in fp16; a 6 x 768 student (the paper's 6-layer student, random
weights, sdpa attention except where ad2's attention KD switches its copy to the pre-dropout eager one). One batch of
32 x 128 tokens (``step_cost.make_batch``: right-padded rows) serves every step.

Per precision (fp16, then bf16; one phase each), one ZeRO-2 engine per method, built from the shipped
``ds_configs/zero2_fp16.json`` / ``zero2_bf16.json`` (``zero2.json`` for fp32) with their "auto" scheduler dropped and
their AdamW replaced by ``torch.optim.AdamW`` with the same hyper-parameters (``zero_allow_untested_optimizer``), so no
DeepSpeed op is JIT-compiled (the script refuses if one is about to be: ``--allow_jit`` lets it). Methods
(``step_cost.METHODS``): kd, ad2-dkd K=1 fast path, ad2-dkd K=1 naive, ad2 K=1 fast with deep KD (hidden states and
attention maps, uniform layer map 6 -> 24, learned 768 -> 1024 projections). Adversarial methods use epsilon = step
size = 1e-2 (a smaller ball rounds away in fp16/bf16; each row records the objective's ``delta_applied``, the share
of the perturbation's norm that survived rounding into the embedding output). Each engine runs with a *cached*
teacher (its ``TeacherOutput`` computed once, cast to the student's dtype, held on the GPU) and a *live* one (the
teacher forward inside the timed step). Beside the engines, a plain loop (same student, ``torch.autocast`` to the
phase's dtype, a ``GradScaler`` for fp16, ``torch.optim.AdamW``, gradient clipping as in the JSON) runs kd and
ad2-dkd fast with the cached teacher, to show what the engine adds.

After the phases (issue 14): the teacher's weights, saved as sharded safetensors before wrapping, are loaded again by
``DeepSpeedTeacher.from_pretrained`` (shard by shard when tp_size > 1, the whole-model path at 1) and its logits
compared with the usual build's; then a TinyLlama-1.1B-shaped ``LlamaForSequenceClassification`` (22 x 2048, 32
heads, 4 kv heads; random, saved and loaded the same way) runs as a teacher on the batch. Both record load seconds,
weights, the allocated rise and peak of the load, and forward ms (``teacher_checks`` in the JSON;
``--no_teacher_checks`` skips them).

Timing as in ``benchmarks/step_cost.py`` (its Runner, interleave and PassCounter are imported): every step ends with
``torch.cuda.synchronize()``, so wall time around a step is the GPU's time for it; the runners of a phase go
round-robin (start rotated each round) after untimed warm-up steps, with one untimed step at each switch; a row's time
is the median of all its timed steps; ``ratio_to_kd`` is that median over kd's of the same phase, loop and teacher
(kd's own is 1), ``per_round`` the range of the per-round ratios. samples/s = global batch / median step time.

Memory (MiB; ``torch.cuda`` allocator on GPU, process RSS on CPU where "reserved" has no meaning and is null):
- ``static``: allocated memory an engine (or the plain loop's student) adds, measured before building it and after its
  first real optimizer step (fp16 steps that overflow are skipped and create no Adam state: it warms until one is
  taken): weights, fp32 master copy, gradient buffers, Adam state;
- ``step_peak``: peak allocated during one step above what was allocated when it began (activations, the ascent's
  graph, teacher activations for a live row), measured after the timed rounds;
- ``teacher_side``: bytes of what the row needs from the teacher: its fp16 weights (live) or the cached outputs it
  reads (cached: logits only, or all hidden states and attention maps for ad2);
- ``alone_estimate`` = static + step_peak + teacher_side: what the row would need on a GPU of its own (the CUDA
  context and the allocator's rounding not included);
- ``build_peak`` / ``build_reserved``: the rise of max_memory_allocated / memory_reserved over building the engine
  and its warm-up steps (the cache emptied first, so the reserved rise is this configuration's own);
- per phase, ``max_allocated`` / ``max_reserved``: the allocator's peaks over the phase, all its runners resident;
  for the whole run, the same since the start.
The JSON also records the card (``nvidia-smi``: name, memory, driver), torch/CUDA/cuDNN/NCCL, DeepSpeed (and where it
was imported from), transformers and Python versions, every step's time, pass counts, and per engine its global and
skipped steps and final loss scale. It is rewritten after each phase (``"complete": false`` until the end), so a run
cut short keeps what finished; a phase that raises is recorded under ``"errors"`` (its traceback), the next one still
runs, and the exit code is 1.

Device call (a later session that is lent a GPU; ``.whl/`` filled first by ``bash benchmarks/gpu_wheels.sh`` in the
checkout the device tool sends, which is git-ignored and travels by ``carry``)::

    run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)

Written for the one lent GPU; under a multi-GPU launcher (torchrun) the teacher would shard over all ranks and rank 0
report its own figures, which nobody has tried yet. Not yet run on a GPU (the session that wrote it had none): its
wall time there is an estimate, 1-3 minutes (wheel install, imports, BERT-large init on the GPU, two phases of ~600
short steps). Limits: ``--budget_s`` (330 s) starts no phase after that, and the shell script's ``timeout`` ends
Python at 420 s, inside the call's 480. The CPU smoke run takes ~11 s on the 2-core build machine. Afterwards copy
``gpu_check.json`` from the reply's files to ``docs/results/gpu_check.json`` and put its tables (stdout, also in
``gpu_check.log``) into ``docs/RESULTS.md`` with the card's name, memory and driver.
"""

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import torch  # noqa: E402

import common  # noqa: E402
from step_cost import METHODS, PassCounter, Runner, interleave, make_batch, per_round_ratio_range  # noqa: E402

CHECK_METHODS = ("kd", "ad2-dkd-k1-fast", "ad2-dkd-k1-naive", "ad2-k1-fast")
PLAIN_METHODS = ("kd", "ad2-dkd-k1-fast")
DS_JSON = {"fp16": "ds_configs/zero2_fp16.json", "bf16": "ds_configs/zero2_bf16.json", "fp32": "ds_configs/zero2.json"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MIB = 2.0**20

# (layers, hidden, heads, ffn) of teacher and student; vocab 30522 in both (make_batch draws ids up to it)
SHAPES = {
    "gpu": {"teacher": (24, 1024, 16, 4096), "student": (6, 768, 12, 3072)},
    "cpu_smoke": {"teacher": (4, 96, 6, 192), "student": (2, 64, 4, 128)},
}
# (layers, hidden, heads, kv heads, ffn) of the decoder teacher: TinyLlama-1.1B's shape on the GPU (vocab 32000)
DECODER_SHAPES = {"gpu": (22, 2048, 32, 4, 5632), "cpu_smoke": (2, 64, 4, 2, 128)}


def bert_config(layers: int, hidden: int, heads: int, ffn: int, attn: str):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=512, num_labels=2, attn_implementation=attn,
    )


class Memory:
    """Allocated / reserved memory now and at peak, in MiB: the CUDA caching allocator, or this process's RSS on CPU
    (VmRSS / VmHWM, the peak reset through ``/proc/self/clear_refs``; no "reserved" there).

    Peaks are reset before each measurement; ``high(name)`` still gives the highest peak since ``track(name)``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.backend = "torch.cuda" if self.cuda else "rss"
        self._highs: Dict[str, List[Optional[float]]] = {}

    @staticmethod
    def _proc_mib(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> float:
        return torch.cuda.memory_allocated() / MIB if self.cuda else self._proc_mib("VmRSS")

    def reserved(self) -> Optional[float]:
        return torch.cuda.memory_reserved() / MIB if self.cuda else None

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated() / MIB if self.cuda else self._proc_mib("VmHWM")

    def peak_reserved(self) -> Optional[float]:
        return torch.cuda.max_memory_reserved() / MIB if self.cuda else None

    def track(self, name: str) -> None:
        """Start a high-water mark of its own (the peaks reset first, so it starts from what is held now)."""
        self.reset_peak()
        self._highs[name] = [self.peak(), self.peak_reserved()]

    def _update_highs(self) -> None:
        now = (self.peak(), self.peak_reserved())
        for high in self._highs.values():
            for i, v in enumerate(now):
                if v is not None and (high[i] is None or v > high[i]):
                    high[i] = v

    def high(self, name: str) -> Dict[str, Optional[float]]:
        self._update_highs()
        alloc, res = self._highs[name]
        return {"max_allocated": r1(alloc), "max_reserved": r1(res)}

    def reset_peak(self) -> None:
        self.sync()
        self._update_highs()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            pass  # the peak then runs from the process start: still an upper bound

    def empty_cache(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def llama_config(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=2048,
                       num_labels=2, pad_token_id=0)  # fmt: skip


def check_teacher_loading(args, ctx, reference_dir: str, log) -> dict:
    """The sharded loader and a decoder teacher, measured in the same call (issue 14).

    ``bert_from_pretrained``: the BERT-large-shaped teacher's weights (saved before wrapping, as sharded safetensors)
    loaded by ``DeepSpeedTeacher.from_pretrained`` (each rank fills only its own shards when tp_size > 1; at tp_size 1
    the whole-model path); its logits on the batch are compared with the teacher built the usual way.
    ``decoder``: a Llama-shaped ``LlamaForSequenceClassification`` (random, saved as safetensors, loaded the same way)
    run as a teacher on the batch. Each: load seconds, weights, allocated rise and peak during the load, median
    forward ms of 3 (after one untimed), finite logits."""
    import tempfile

    from transformers import LlamaForSequenceClassification

    from ad2_ds.teachers import DeepSpeedTeacher

    mem, device, batch, world = ctx["mem"], ctx["device"], ctx["batch"], ctx["world"]
    dtype = DTYPES[args.teacher_dtype]
    out: dict = {}

    def measure(name, path, reference=None, **kwargs):
        mem.empty_cache()
        before = mem.allocated()
        mem.reset_peak()
        t0 = time.perf_counter()
        teacher = DeepSpeedTeacher.from_pretrained(path, tp_size=world, dtype=dtype, **kwargs)
        mem.sync()
        module = teacher.engine.module
        row = {
            "load_s": round(time.perf_counter() - t0, 2),
            "tp_size": teacher.tp_size,
            "sharded_load": teacher.tp_size > 1,
            "weights_mib": r1(tensor_mib([*module.parameters(), *module.buffers()])),
            "allocated_rise_mib": r1(mem.allocated() - before),
            "load_peak_rise_mib": r1(mem.peak() - before),
        }
        logits = teacher(batch).logits
        times = []
        for _ in range(3):
            mem.sync()
            t0 = time.perf_counter()
            logits = teacher(batch).logits
            mem.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        row.update(forward_ms=round(statistics.median(times), 2), finite_logits=bool(torch.isfinite(logits).all()))
        if reference is not None:
            row["max_abs_diff_vs_usual_build"] = float((logits.float() - reference.float()).abs().max())
        out[name] = row
        log(f"{name}: {row}")
        del teacher
        mem.empty_cache()

    def decoder():
        with tempfile.TemporaryDirectory(dir=args.out_dir) as d:
            torch.manual_seed(args.seed + 2)
            with torch.device(device):
                model = LlamaForSequenceClassification(llama_config(*DECODER_SHAPES[args.mode])).to(dtype)
            out["decoder_params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
            model.save_pretrained(d, max_shard_size="500MB")
            del model
            measure("decoder", d)

    def bert():  # eager attention, as the usual build (its reference logits) uses
        measure("bert_from_pretrained", reference_dir, ctx["reference_logits"], attn_implementation="eager")

    checks = {"bert_from_pretrained": bert, "decoder": decoder}
    for name, check in checks.items():
        try:
            check()
        except Exception:  # noqa: BLE001 - recorded; the step-cost phases above keep their figures
            out.setdefault("errors", {})[name] = traceback.format_exc()
            log(f"{name}: FAILED\n{out['errors'][name]}")
    return out


def r1(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else round(x, 1)


def tensor_mib(tensors) -> float:
    """Bytes of the distinct storages among ``tensors`` (None skipped), in MiB."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total / MIB


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


def guard_jit(allow: bool) -> None:
    """Fail fast instead of spending minutes of GPU time compiling a DeepSpeed op nobody asked for."""
    if allow:
        return
    from deepspeed.ops.op_builder.builder import OpBuilder

    def refuse(self, verbose=True):
        raise RuntimeError(
            f"gpu_check: DeepSpeed is about to JIT-compile its {self.name!r} op; this check is built to need none "
            "(torch AdamW, no kernel injection). Find what asked for it, or pass --allow_jit"
        )

    OpBuilder.jit_load = refuse


def gpu_info() -> dict:
    info: Dict[str, object] = {"nvidia_smi": None}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()
        info["nvidia_smi"] = out or None
        name, memory, driver = [s.strip() for s in out.splitlines()[0].split(",")]
        info.update(gpu_name=name, gpu_memory=memory, driver=driver)
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            torch_device_name=props.name, torch_total_memory_mib=round(props.total_memory / MIB),
            capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
            device_count=torch.cuda.device_count(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    return info


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


MODES = {
    "gpu": dict(precisions="fp16,bf16", teacher_dtype="fp16", batch_size=32, seq_len=128, rounds=8, steps=5,
                warmup=2, max_warm=12, budget_s=330.0),
    "cpu_smoke": dict(precisions="bf16,fp32", teacher_dtype="bf16", batch_size=4, seq_len=16, rounds=2, steps=1,
                      warmup=1, max_warm=4, budget_s=600.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu_smoke", action="store_true",
                   help="tiny models on CPU/gloo, bf16 and fp32 (fp16 is GPU-only): the same code path, in seconds")
    p.add_argument("--precisions", default=None, help="comma-separated phases: fp16, bf16, fp32 (gpu: fp16,bf16)")
    p.add_argument("--teacher_dtype", default=None, choices=("fp16", "bf16", "fp32"))
    p.add_argument("--methods", default=",".join(CHECK_METHODS), help=f"subset of {', '.join(CHECK_METHODS)}")
    p.add_argument("--batch_size", type=int, default=None, help="per rank (gpu: 32)")
    p.add_argument("--seq_len", type=int, default=None, help="gpu: 128")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per runner per round")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per runner before the first round")
    p.add_argument("--max_warm", type=int, default=None, help="cap on the build's steps waiting for a real step")
    p.add_argument("--epsilon", type=float, default=1e-2, help="adversarial ball radius (large enough for fp16)")
    p.add_argument("--step_size", type=float, default=None, help="ascent step (default: epsilon)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_plain", action="store_true", help="skip the plain-loop rows")
    p.add_argument("--allow_jit", action="store_true", help="let DeepSpeed JIT-compile ops (refused by default)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="start no further phase after this many seconds (gpu: 330), so the call ends in time")
    p.add_argument("--out_dir", default=os.environ.get("OUT") or "gpu_check_out")
    p.add_argument("--no_teacher_checks", action="store_true",
                   help="skip the sharded-loader and decoder-teacher checks after the phases")  # fmt: skip
    args = p.parse_args(argv)
    args.mode = "cpu_smoke" if args.cpu_smoke else "gpu"
    for k, v in MODES[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in CHECK_METHODS] + [q for q in args.precisions if q not in DTYPES]
    if bad:
        p.error(f"unknown methods or precisions {bad}")
    if "kd" not in args.methods:
        args.methods.insert(0, "kd")  # every ratio is to kd
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --cpu_smoke for the CPU run of the same path")
    import logging

    import deepspeed
    from transformers import BertForSequenceClassification

    from ad2_ds import TeacherOutput, dist
    from ad2_ds.teachers import DeepSpeedTeacher

    deepspeed.utils.logger.setLevel(logging.WARNING)
    guard_jit(args.allow_jit)
    dist.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    log = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)
    device = torch.device("cuda", torch.cuda.current_device()) if args.mode == "gpu" else torch.device("cpu")
    mem = Memory(device)
    mem.track("run")
    shapes = SHAPES[args.mode]
    env = common.environment(threads=torch.get_num_threads(), **gpu_info(), world_size=world,
                             deepspeed_file=deepspeed.__file__, device=str(device))
    keys = ("gpu_name", "gpu_memory", "driver", "cuda", "torch", "deepspeed", "transformers", "python")
    log(f"gpu_check ({args.mode}): {json.dumps({k: env.get(k) for k in keys})}")

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    before = mem.allocated()
    with torch.device(device):  # random init where it will run: a BERT-large init on the CPU takes seconds
        model_t = BertForSequenceClassification(bert_config(*shapes["teacher"], attn="eager"))
    os.makedirs(args.out_dir, exist_ok=True)
    teacher_dir = None
    if not args.no_teacher_checks:  # the same weights as safetensors, for the sharded loader's check at the end
        import tempfile

        teacher_dir = tempfile.mkdtemp(prefix="teacher-", dir=args.out_dir)
        model_t.save_pretrained(teacher_dir, max_shard_size="200MB")
    teacher = DeepSpeedTeacher(model_t, tp_size=world, dtype=DTYPES[args.teacher_dtype],
                               output_hidden_states=True, output_attentions=True)
    teacher_config = model_t.config
    del model_t
    mem.empty_cache()
    module_t = teacher.engine.module
    teacher_weights_mib = tensor_mib([*module_t.parameters(), *module_t.buffers()])
    teacher_info = {
        "class": "DeepSpeedTeacher", "tp_size": teacher.tp_size, "dtype": args.teacher_dtype,
        "shape": dict(zip(("layers", "hidden", "heads", "ffn"), shapes["teacher"])), "attention": "eager",
        "params_m": round(sum(p.numel() for p in module_t.parameters()) / 1e6, 1),
        "weights_mib": r1(teacher_weights_mib), "allocated_rise_mib": r1(mem.allocated() - before),
        "build_s": round(time.perf_counter() - t0, 1),
    }
    log(f"teacher: {teacher_info}")
    torch.manual_seed(args.seed + 1)
    student = BertForSequenceClassification(bert_config(*shapes["student"], attn="sdpa")).train()
    batch = {k: v.to(device) for k, v in make_batch(args.batch_size, args.seq_len, args.seed).items()}
    deep_raw = teacher(batch)  # hidden states and maps on (the teacher was built with them)
    ctx = {
        "mem": mem, "device": device, "batch": batch, "teacher": teacher, "teacher_config": teacher_config,
        "teacher_weights_mib": teacher_weights_mib, "student": student, "global_batch": args.batch_size * world,
        "cached_raw": {False: TeacherOutput(deep_raw.logits), True: deep_raw},
        "world": world, "reference_logits": deep_raw.logits,
    }
    result = {
        "command": "bash benchmarks/gpu_check.sh" if args.mode == "gpu" else "python benchmarks/gpu_check.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "mode": args.mode, "complete": False, "environment": env, "teacher": teacher_info,
        "setup": {
            "student": {**dict(zip(("layers", "hidden", "heads", "ffn"), shapes["student"])), "attention": "sdpa "
                        "(ad2: its copy switched to the pre-dropout eager attention)",
                        "params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 1)},
            "vocab": 30522, "num_labels": 2, "weights": "random", "batch_size_per_rank": args.batch_size,
            "seq_len": args.seq_len, "world_size": world, "rounds": args.rounds, "steps": args.steps,
            "warmup": args.warmup, "epsilon": args.epsilon, "step_size": args.step_size or args.epsilon,
            "methods": {m: METHODS[m][0] for m in args.methods}, "precisions": args.precisions,
            "timing": "wall time around each step, which ends with torch.cuda.synchronize(); median of timed steps",
            "memory_backend": mem.backend, "memory_unit": "MiB",
        },
        "phases": {},
        "skipped_phases": [],
        "errors": {},
    }
    os.makedirs(args.out_dir, exist_ok=True)
    out_path = os.path.join(args.out_dir, "gpu_check.json")

    def write():
        result["memory_mib"] = mem.high("run")
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)

    for precision in args.precisions:
        if time.perf_counter() - t_start > args.budget_s:
            log(f"{precision}: skipped, {args.budget_s:.0f} s budget spent")
            result["skipped_phases"].append(precision)
            continue
        try:
            phase = Phase(args, precision, ctx, log).run()
        except Exception:  # noqa: BLE001 - keep the other phase's figures; the exit code still says it failed
            result["errors"][precision] = traceback.format_exc()
            log(f"{precision}: FAILED\n{result['errors'][precision]}")
            write()
            continue
        result["phases"][precision] = phase
        write()
        print_phase(phase, log)
    if teacher_dir is not None:
        if time.perf_counter() - t_start > args.budget_s:
            log(f"teacher checks: skipped, {args.budget_s:.0f} s budget spent")
            result["skipped_phases"].append("teacher_checks")
        else:
            del ctx["cached_raw"], deep_raw
            result["teacher_checks"] = check_teacher_loading(args, ctx, teacher_dir, log)
            if result["teacher_checks"].get("errors"):
                result["errors"]["teacher_checks"] = result["teacher_checks"]["errors"]
        import shutil

        shutil.rmtree(teacher_dir, ignore_errors=True)
    result["complete"] = not result["skipped_phases"] and not result["errors"]
    write()
    summary = {p: {r["name"]: r["ratio_to_kd"] for r in ph["results"]} for p, ph in result["phases"].items()}
    log(json.dumps({"ratio_to_kd": summary, "wall_s": result["wall_s"], "json": out_path}))
    dist.clean_exit(0 if not result["errors"] else 1)


if __name__ == "__main__":
    main()
