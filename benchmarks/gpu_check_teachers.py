"""The ``teacher_checks`` phase of the GPU check: the sharded loader and a decoder teacher (issue 14)::

    bash benchmarks/gpu_check.sh                         # every phase; GPU_CHECK_PHASES=teacher_checks alone
    python benchmarks/gpu_check.py --cpu_smoke --phases teacher_checks --out_dir /tmp/gc
"""

import shutil
import statistics
import time
import traceback
from typing import Callable

import torch

from gpu_check_base import DECODER_SHAPES, DTYPES, llama_config, r1, tensor_mib

NAME = "teacher_checks"


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


def forget(result: dict) -> None:
    """Drop what an earlier run of this phase wrote into ``result`` (it is about to be run again)."""
    result.pop(NAME, None)
    result["errors"].pop(NAME, None)
    result["skipped_phases"] = [k for k in result["skipped_phases"] if k != NAME]


def run(args, ctx: dict, result: dict, write: Callable[[], None], over_budget: Callable[[], bool]) -> None:
    """The checks into ``result["teacher_checks"]`` (a check that raises: its traceback under ``"errors"`` there and
    in ``result["errors"]``); the teacher's saved weights are removed afterwards."""
    log = ctx["log"]
    try:
        if over_budget():
            log(f"{NAME}: skipped, {args.budget_s:.0f} s budget spent")
            result["skipped_phases"].append(NAME)
            return
        ctx.pop("cached_raw", None)  # the cached teacher outputs: not needed here, and the decoder wants the memory
        result[NAME] = check_teacher_loading(args, ctx, ctx["teacher_dir"], log)
        if result[NAME].get("errors"):
            result["errors"][NAME] = result[NAME]["errors"]
    finally:
        shutil.rmtree(ctx["teacher_dir"], ignore_errors=True)
        write()
