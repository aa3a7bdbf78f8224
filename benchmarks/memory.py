"""Memory per rank: the teacher at TP=1 vs TP=2, fp32 vs bf16, and the student's optimizer state at ZeRO-0 vs ZeRO-2.

    PYTHONPATH=. python benchmarks/memory.py --json_out docs/results/memory.json
    PYTHONPATH=. python benchmarks/memory.py --teachers bert-large --dtypes bf16 --no_student

Every configuration runs in fresh processes (``ad2_ds.testing.launch`` with the spawn start method: exec gives each
rank a new address space, so its peak RSS belongs to that configuration only). Each rank reads its resident memory
from ``/proc/self/status`` (VmRSS now, VmHWM the peak) at fixed points, resetting the peak (``clear_refs`` 5) between
phases so every phase gets its own peak:

- ``base``: after importing torch, transformers, deepspeed and ad2_ds and initialising the process group (gloo);
- ``load``: building the teacher the way ``recipes/distill_glue.py`` does (fp32 ``from_pretrained`` for the real
  checkpoint, ``BertForSequenceClassification(config)`` for the random BERT-large), peak while building;
- ``wrap``: ``LocalTeacher(model, dtype=...)`` at TP=1, ``DeepSpeedTeacher(model, tp_size=2, dtype=...)`` at TP=2
  (AutoTP sharding), peak;
- ``forward``: one ``teacher(batch)`` (default 16 x 64 tokens, hidden states returned as deep KD needs them), peak;
- ``after``: the output dropped; RSS now is the steady footprint (weights loaded from safetensors are mmapped and
  only become resident when first touched, so RSS right after loading understates them). RSS is also split into
  anonymous memory (RssAnon: tensors the process allocated) and file-backed pages (RssFile: the mmapped checkpoint);
- ``trimmed``: after ``malloc_trim(0)``: glibc keeps freed heap (e.g. the full fp32 weights dropped after sharding or
  casting) unless asked to return it; anonymous memory left now is what the process really holds.

Parameter bytes per rank are summed over the tensors the rank really holds after wrapping (numel x element_size,
each storage counted once, so tied embeddings count once). The student part builds a 3-layer MiniLM-shaped BERT,
wraps it in ``AD2Objective(method="kd")`` and a 2-rank DeepSpeed engine (torch AdamW,
``zero_allow_untested_optimizer``) at ZeRO-0 and ZeRO-2, fp32 and bf16, takes one step, and sums the optimizer's
state tensors (exp_avg, exp_avg_sq, step) and the fp32 master partitions it steps (ZeRO's flat fp32 partition, bf16's
fp32 copy; at ZeRO-0 fp32 torch AdamW steps the model's own parameters, which are not counted again).
"""
import argparse
import gc
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TEACHERS = {
    "mpnet": "all-mpnet-base-v2 (real weights, 12 x 768, 109M params)",
    "bert-large": "BERT-large shape (24 x 1024, 16 heads, FFN 4096, vocab 30522), random weights",
}


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: VmHWM := VmRSS


class Meter:
    """RSS now and the peak since the last mark, in MiB, per named phase."""

    def __init__(self):
        self.points = {}

    def mark(self, name: str) -> None:
        gc.collect()
        self.points[name] = {"rss_mib": _proc_kib("VmRSS") / 1024, "peak_mib": _proc_kib("VmHWM") / 1024,
                             "anon_mib": _proc_kib("RssAnon") / 1024, "file_mib": _proc_kib("RssFile") / 1024}
        _reset_peak()


def held_bytes(tensors) -> int:
    """numel x element_size over distinct storages."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def bert_large_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096, max_position_embeddings=512, num_labels=2)


def minilm_config(layers: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=layers, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512, num_labels=2)


def _teacher_rank(rank, world_size, teacher, dtype_name, batch_size, seq_len):
    meter = Meter()
    import deepspeed  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from ad2_ds import dist
    from ad2_ds import teachers as T

    dist.init_distributed()
    torch.manual_seed(0)
    meter.mark("base")
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    if teacher == "mpnet":
        from ad2_ds.data.assets import resolve_model

        model = AutoModelForSequenceClassification.from_pretrained(str(resolve_model("all-mpnet-base-v2")),
                                                                   num_labels=2)
    else:
        model = BertForSequenceClassification(bert_large_config())
    n_params_full = sum(p.numel() for p in model.parameters())
    meter.mark("load")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if world_size == 1:
        t = T.LocalTeacher(model, output_hidden_states=True, dtype=dtype)
        module = t.model
    else:
        t = T.DeepSpeedTeacher(model, tp_size=world_size, dtype=dtype, output_hidden_states=True)
        module = t.engine.module
    del model
    meter.mark("wrap")
    params = held_bytes(p.data for p in module.parameters())
    buffers = held_bytes(b for b in module.buffers())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    t0 = time.perf_counter()
    try:
        out = t(batch)
        error = None
    except Exception as e:  # noqa: BLE001 - recorded: the memory up to here is still measured
        out, error = None, f"{type(e).__name__}: {e}"
    fwd_s = time.perf_counter() - t0
    out_bytes = held_bytes([out.logits, *out.hidden_states]) if out is not None else 0
    meter.mark("forward")
    del out
    meter.mark("after")
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand glibc's freed-but-kept heap back: what is left is really held
    meter.mark("trimmed")
    return {"forward_error": error, "points": meter.points, "param_bytes": params, "buffer_bytes": buffers,
            "params_full": n_params_full,
            "params_held": sum(p.numel() for p in module.parameters()), "output_bytes": out_bytes,
            "forward_s": round(fwd_s, 2)}


def optimizer_state_bytes(engine, model_params) -> dict:
    """Bytes of the optimizer state and of the master copies it steps (params not owned by the model)."""
    import torch

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps a torch optimizer; at ZeRO-0 fp32 it is the torch one
    own = {p.untyped_storage().data_ptr() for p in model_params}
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    by_key = {}
    for s in inner.state.values():
        for k, v in s.items():
            if torch.is_tensor(v):
                by_key[k] = by_key.get(k, 0) + v.numel() * v.element_size()
    masters = [p for g in inner.param_groups for p in g["params"] if p.untyped_storage().data_ptr() not in own]
    return {"wrapper": type(opt).__name__, "inner": type(inner).__name__, "state_bytes": held_bytes(state),
            "state_bytes_by_key": by_key, "master_bytes": held_bytes(masters),
            "master_numel": sum(p.numel() for p in masters)}


def _student_rank(rank, world_size, stage, batch_size, seq_len, dtype_name="fp32"):
    meter = Meter()
    import deepspeed
    import torch

    from ad2_ds import AD2Config, AD2Objective, TeacherOutput, dist

    dist.init_distributed()
    meter.mark("base")
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    student = BertForSequenceClassification(minilm_config(3)).train()
    objective = AD2Objective(student, AD2Config(method="kd"))
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-5)
    ds_config = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**9}
    if dtype_name == "bf16":
        ds_config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=objective, optimizer=opt, config=ds_config)
    meter.mark("engine")
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.randint(0, 2, (batch_size,), generator=g)}
    losses = engine(batch, TeacherOutput(torch.randn(batch_size, 2, generator=g) * 5))
    engine.backward(losses["loss"])
    engine.step()
    meter.mark("step")
    model_params = list(student.parameters())
    return {"points": meter.points, "optimizer": optimizer_state_bytes(engine, model_params),
            "model_param_bytes": held_bytes(p.data for p in model_params),
            "model_params": sum(p.numel() for p in model_params)}


def environment() -> dict:
    mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return common.environment(mem_total_gib=mem_gib)


def _mib(b):
    return b / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teachers", default="mpnet,bert-large")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--no_student", action="store_true")
    p.add_argument("--student_batch_size", type=int, default=32)
    p.add_argument("--student_dtypes", default="fp32,bf16")
    p.add_argument("--timeout_s", type=float, default=900)
    p.add_argument("--json_out", default=None)
    args = p.parse_args(argv)
    from ad2_ds.testing import launch

    teacher_rows = []
    for name in args.teachers.split(","):
        for dtype in args.dtypes.split(","):
            for tp in map(int, args.tp.split(",")):
                t0 = time.perf_counter()
                ranks = launch(_teacher_rank, world_size=tp, args=(name, dtype, args.batch_size, args.seq_len),
                               timeout_s=args.timeout_s, start_method="spawn")
                r = ranks[0]
                pts = r["points"]
                row = {"teacher": name, "dtype": dtype, "tp": tp,
                       "base_rss_mib": round(pts["base"]["rss_mib"]),
                       "load_peak_mib": round(pts["load"]["peak_mib"]),
                       "wrap_peak_mib": round(pts["wrap"]["peak_mib"]),
                       "wrapped_rss_mib": round(pts["wrap"]["rss_mib"]),
                       "steady_rss_mib": round(pts["after"]["rss_mib"]),
                       "base_anon_mib": round(pts["base"]["anon_mib"]),
                       "base_file_mib": round(pts["base"]["file_mib"]),
                       "steady_anon_increment_mib": round(pts["after"]["anon_mib"] - pts["base"]["anon_mib"]),
                       "trimmed_anon_increment_mib": round(pts["trimmed"]["anon_mib"] - pts["base"]["anon_mib"]),
                       "steady_file_increment_mib": round(pts["after"]["file_mib"] - pts["base"]["file_mib"]),
                       "forward_peak_mib": round(pts["forward"]["peak_mib"]),
                       "peak_mib": round(max(v["peak_mib"] for v in pts.values())),
                       "param_mib": round(_mib(r["param_bytes"]), 1), "buffer_mib": round(_mib(r["buffer_bytes"]), 2),
                       "params_full": r["params_full"], "params_held": r["params_held"],
                       "output_mib": round(_mib(r["output_bytes"]), 1), "forward_s": r["forward_s"],
                       "forward_error": r["forward_error"],
                       "per_rank": ranks, "wall_s": round(time.perf_counter() - t0, 1)}
                row["steady_increment_mib"] = row["steady_rss_mib"] - row["base_rss_mib"]
                row["peak_increment_mib"] = row["peak_mib"] - row["base_rss_mib"]
                teacher_rows.append(row)
                print(f"{name:<10} {dtype} tp={tp}: base {row['base_rss_mib']} MiB, params/rank "
                      f"{row['param_mib']} MiB, steady +{row['steady_increment_mib']} MiB, peak "
                      f"+{row['peak_increment_mib']} MiB (load {row['load_peak_mib']}, wrap {row['wrap_peak_mib']}, "
                      f"forward {row['forward_peak_mib']}); {row['wall_s']} s"
                      + (f"; FORWARD FAILED: {row['forward_error']}" if row["forward_error"] else ""), flush=True)

    student_rows = []
    if not args.no_student:
        for sdtype, stage in ((d, s) for d in args.student_dtypes.split(",") for s in (0, 2)):
            try:
                ranks = launch(_student_rank, world_size=2,
                               args=(stage, args.student_batch_size, args.seq_len, sdtype), timeout_s=args.timeout_s,
                               start_method="spawn")
            except RuntimeError as e:
                msg = str(e).splitlines()[0][:500]
                print(f"ZeRO-{stage} {sdtype}: FAILED: {msg}", flush=True)
                student_rows.append({"stage": stage, "dtype": sdtype, "error": msg})
                continue
            for rank, r in enumerate(ranks):
                o = r["optimizer"]
                pts = r["points"]
                row = {"stage": stage, "dtype": sdtype, "rank": rank, "optimizer": f"{o['wrapper']} / {o['inner']}",
                       "model_params": r["model_params"], "model_param_mib": round(_mib(r["model_param_bytes"]), 1),
                       "state_mib": round(_mib(o["state_bytes"]), 1),
                       "state_mib_by_key": {k: round(_mib(v), 2) for k, v in o["state_bytes_by_key"].items()},
                       "master_mib": round(_mib(o["master_bytes"]), 1), "master_numel": o["master_numel"],
                       "base_rss_mib": round(pts["base"]["rss_mib"]),
                       "after_step_rss_mib": round(pts["step"]["rss_mib"]),
                       "step_peak_mib": round(pts["step"]["peak_mib"])}
                student_rows.append(row)
                print(f"ZeRO-{stage} {sdtype} rank {rank}: {row['optimizer']}: state {row['state_mib']} MiB "
                      f"{row['state_mib_by_key']}, fp32 master {row['master_mib']} MiB; RSS after step "
                      f"{row['after_step_rss_mib']} (base {row['base_rss_mib']})", flush=True)

    env = environment()
    print(f"\nTeacher memory per rank (MiB; base = RSS after imports + process group; batch "
          f"{args.batch_size}x{args.seq_len}, hidden states returned)")
    print(f"{'teacher':<11}{'dtype':<6}{'TP':>3}{'params/rank':>12}{'base':>7}{'steady +':>10}{'load peak':>11}"
          f"{'wrap peak':>11}{'fwd peak':>10}{'peak +':>8}{'anon +':>8}{'file +':>8}{'trim anon +':>12}")
    for r in teacher_rows:
        print(f"{r['teacher']:<11}{r['dtype']:<6}{r['tp']:>3}{r['param_mib']:>12.1f}{r['base_rss_mib']:>7}"
              f"{r['steady_increment_mib']:>10}{r['load_peak_mib']:>11}{r['wrap_peak_mib']:>11}"
              f"{r['forward_peak_mib']:>10}"
              f"{r['peak_increment_mib']:>8}{r['steady_anon_increment_mib']:>8}{r['steady_file_increment_mib']:>8}"
              f"{r['trimmed_anon_increment_mib']:>12}" + ("  forward failed" if r["forward_error"] else ""))
    if student_rows:
        print("\nStudent optimizer state per rank (3-layer MiniLM shape, torch AdamW, after one step; MiB)")
        for r in student_rows:
            if "error" in r:
                print(f"ZeRO-{r['stage']} {r['dtype']}: failed: {r['error']}")
                continue
            print(f"ZeRO-{r['stage']} {r['dtype']} rank {r['rank']}: state {r['state_mib']:>6.1f}  "
                  f"fp32 master {r['master_mib']:>6.1f}"
                  f"  total {r['state_mib'] + r['master_mib']:>6.1f}  (model params {r['model_param_mib']})")
    cmd_args = sys.argv[1:] if argv is None else argv
    result = {"command": "PYTHONPATH=. python benchmarks/memory.py " + " ".join(cmd_args),
              "environment": env, "teachers": TEACHERS, "teacher_rows": teacher_rows, "student_rows": student_rows}
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
