"""Memory per rank: the teacher at TP=1 vs TP=2, fp32 vs bf16, and the student's optimizer state at ZeRO-0 vs ZeRO-2.

    PYTHONPATH=. python benchmarks/memory.py --json_out docs/results/memory.json
    PYTHONPATH=. python benchmarks/memory.py --teachers bert-large --dtypes bf16 --no_student
    PYTHONPATH=. python benchmarks/memory.py --disk bert-base,bert-large --tp 1,2,4 --no_student \
        --json_out docs/results/memory_sharded.json      # real safetensors files, sharded loading (below)

``--disk``: the teachers are written once as sharded safetensors checkpoints on disk (random weights, written tensor by
tensor: BERT-base and BERT-large in fp32 as BERT checkpoints ship, the 1.03B-parameter TinyLlama-shaped decoder in bf16
as LLM checkpoints ship) and loaded the way the library does: at TP=1 ``from_pretrained(dir, dtype=...)`` then
``LocalTeacher``, at TP>1 ``DeepSpeedTeacher.from_pretrained`` (each rank fills only its own shards). A thread samples
each rank's anonymous memory (RssAnon) every 2 ms, so every phase (load, forward, after) gets its own anonymous peak
next to its file-backed pages (RssFile: the memory-mapped checkpoint, shared through the page cache). The ranks get
the environment the script was started with (no allocator variable is set: the ``MALLOC_*`` variables found are
recorded in the JSON, and a user runs without any). The expected floor is the bytes a rank holds after loading (its
shards + the layers every rank replicates).

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

import common

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


def bert_base_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512, num_labels=2)


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
    import torch

    from ad2_ds import AD2Config, AD2Objective, TeacherOutput, dist
    from ad2_ds.engine import build_engine

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
    engine, _ = build_engine(objective, ds_config, optimizer=opt, single_rank_path=False)  # exactly this JSON
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


DISK_TEACHERS = {
    "bert-base": "BERT-base shape (12 x 768, 12 heads, FFN 3072, vocab 30522, 109M params), fp32 safetensors",
    "bert-large": "BERT-large shape (24 x 1024, 16 heads, FFN 4096, vocab 30522, 335M params), fp32 safetensors",
    "llama-1b": "TinyLlama-1.1B shape (22 x 2048, 32 heads, 4 kv heads, FFN 5632, vocab 32000, 1.03B params), "
    "bf16 safetensors",
}


def disk_config(kind: str):
    from transformers import LlamaConfig

    if kind in ("bert-base", "bert-large"):
        cfg = bert_large_config() if kind == "bert-large" else bert_base_config()
        cfg.architectures = ["BertForSequenceClassification"]
        return cfg, "float32"
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048, num_labels=2,
                      pad_token_id=0, architectures=["LlamaForSequenceClassification"])  # fmt: skip
    return cfg, "bfloat16"


def write_random_checkpoint(kind: str, path: str, shard_mib: int = 256) -> dict:
    """A sharded safetensors checkpoint of random weights, written tensor by tensor (the writer never holds more
    than one file's worth), with its index, like ``save_pretrained(max_shard_size=...)``."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    cfg, dtype_name = disk_config(kind)
    dtype = getattr(torch, dtype_name)
    done = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)["metadata"]
    os.makedirs(path, exist_ok=True)
    with init_empty_weights():
        skeleton = AutoModelForSequenceClassification.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    shard, shard_bytes, files, weight_map, total, numel = {}, 0, [], {}, 0, 0

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})

    for key, t in skeleton.state_dict().items():
        if key.endswith("norm.weight") or key.endswith("LayerNorm.weight"):
            value = torch.ones(t.shape, dtype=dtype)
        elif key.endswith("bias"):
            value = torch.zeros(t.shape, dtype=dtype)
        else:
            value = (torch.randn(t.shape, generator=g) * 0.02).to(dtype)
        shard[key] = value
        shard_bytes += value.numel() * value.element_size()
        total += value.numel() * value.element_size()
        numel += value.numel()
        if shard_bytes >= shard_mib * 2**20:
            flush()
            shard, shard_bytes = {}, 0
    if shard:
        flush()
    cfg.save_pretrained(path)
    meta = {"total_size": str(total), "params": str(numel), "dtype": dtype_name}
    with open(done, "w") as f:
        json.dump({"metadata": meta, "weight_map": weight_map}, f)
    return meta


class AnonSampler:
    """RssAnon/RssFile of this process sampled every ``period_s`` by a thread; ``mark`` closes a phase."""

    def __init__(self, period_s: float = 0.002):
        import threading

        self.points, self._stop = {}, threading.Event()
        self._anon_peak = self._file_peak = 0
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)
        self._thread.start()

    def _sample(self):
        with open("/proc/self/status") as f:
            text = f.read()
        anon = int(re.search(r"^RssAnon:\s+(\d+) kB", text, re.M).group(1))
        file = int(re.search(r"^RssFile:\s+(\d+) kB", text, re.M).group(1))
        self._anon_peak, self._file_peak = max(self._anon_peak, anon), max(self._file_peak, file)
        return anon, file

    def _run(self, period_s):
        while not self._stop.wait(period_s):
            self._sample()

    def mark(self, name: str) -> None:
        gc.collect()
        anon, file = self._sample()
        self.points[name] = {
            "anon_mib": anon / 1024,
            "file_mib": file / 1024,
            "anon_peak_mib": self._anon_peak / 1024,
            "file_peak_mib": self._file_peak / 1024,
        }
        self._anon_peak, self._file_peak = anon, file

    def stop(self):
        self._stop.set()
        self._thread.join()


def _disk_teacher_rank(rank, world_size, path, dtype_name, batch_size, seq_len):
    meter = AnonSampler()
    import accelerate  # noqa: F401
    import deepspeed  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401 - imported before "base": code, not weights
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForSequenceClassification

    from ad2_ds import dist
    from ad2_ds import teachers as T

    dist.init_distributed()
    meter.mark("base")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    if world_size == 1:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        t = T.LocalTeacher(model, output_hidden_states=True)
        module = t.model
        del model
    else:
        t = T.DeepSpeedTeacher.from_pretrained(path, tp_size=world_size, dtype=dtype, output_hidden_states=True)
        module = t.engine.module
    load_s = time.perf_counter() - t0
    meter.mark("load")
    params = held_bytes(p.data for p in module.parameters())
    buffers = held_bytes(b for b in module.buffers())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 30000, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    t0 = time.perf_counter()
    out = t(batch)
    fwd_s = time.perf_counter() - t0
    out_bytes = held_bytes([out.logits, *out.hidden_states])
    finite = bool(torch.isfinite(out.logits).all())
    meter.mark("forward")
    del out
    meter.mark("after")
    meter.stop()
    return {"points": meter.points, "param_bytes": params, "buffer_bytes": buffers, "output_bytes": out_bytes,
            "load_s": round(load_s, 1), "forward_s": round(fwd_s, 1), "finite": finite}  # fmt: skip


def disk_rows(args) -> list:
    from ad2_ds.testing import launch

    rows = []
    for kind in args.disk.split(","):
        path = os.path.join(args.checkpoint_dir, kind)
        t0 = time.perf_counter()
        meta = write_random_checkpoint(kind, path)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        print(f"{kind}: {meta['params']} params, {int(meta['total_size']) / 2**20:.0f} MiB in {len(files)} "
              f"safetensors files ({meta['dtype']}), {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        for dtype in args.dtypes.split(","):
            for tp in map(int, args.tp.split(",")):
                t0 = time.perf_counter()
                batch = args.batch_size if kind.startswith("bert") else args.decoder_batch_size
                ranks = launch(_disk_teacher_rank, world_size=tp, args=(path, dtype, batch, args.seq_len),
                               timeout_s=args.timeout_s, start_method="spawn")  # fmt: skip
                r = ranks[0]
                pts = r["points"]
                base = pts["base"]["anon_mib"]
                held = _mib(r["param_bytes"] + r["buffer_bytes"])
                row = {
                    "teacher": kind, "checkpoint_dtype": meta["dtype"], "dtype": dtype, "tp": tp,
                    "batch": f"{batch}x{args.seq_len}",
                    "held_mib": round(held, 1),
                    "load_anon_peak_mib": round(pts["load"]["anon_peak_mib"] - base, 1),
                    "load_file_peak_mib": round(pts["load"]["file_peak_mib"], 1),
                    "steady_anon_mib": round(pts["after"]["anon_mib"] - base, 1),
                    "steady_file_mib": round(pts["after"]["file_mib"], 1),
                    "forward_anon_peak_mib": round(pts["forward"]["anon_peak_mib"] - base, 1),
                    "base_anon_mib": round(base, 1),
                    "load_peak_over_held": round((pts["load"]["anon_peak_mib"] - base) / held, 2),
                    "load_s": r["load_s"], "forward_s": r["forward_s"], "finite_logits": r["finite"],
                    "max_rank_load_anon_peak_mib": round(max(x["points"]["load"]["anon_peak_mib"]
                                                             - x["points"]["base"]["anon_mib"] for x in ranks), 1),
                    "per_rank": ranks, "wall_s": round(time.perf_counter() - t0, 1),
                }  # fmt: skip
                rows.append(row)
                print(f"{kind:<10} {dtype} tp={tp}: held {row['held_mib']} MiB/rank; anon peak load "
                      f"+{row['load_anon_peak_mib']} ({row['load_peak_over_held']}x held), forward "
                      f"+{row['forward_anon_peak_mib']}, steady +{row['steady_anon_mib']}; file pages load peak "
                      f"{row['load_file_peak_mib']}, steady {row['steady_file_mib']}; load {r['load_s']} s, "
                      f"forward {r['forward_s']} s", flush=True)  # fmt: skip
    return rows


def malloc_env() -> dict:
    """The glibc allocator variables in the environment (the ranks inherit it): {} when run as a user runs it."""
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


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
    p.add_argument("--disk", default=None, help="teachers from safetensors on disk: bert-large,llama-1b")
    p.add_argument("--checkpoint_dir", default="/tmp/ad2_ds_memory_checkpoints")
    p.add_argument("--decoder_batch_size", type=int, default=4)
    args = p.parse_args(argv)
    from ad2_ds.testing import launch

    if args.disk:
        unknown = sorted(set(args.disk.split(",")) - set(DISK_TEACHERS))
        if unknown:
            p.error(f"--disk: unknown teachers {unknown}; known: {sorted(DISK_TEACHERS)}")
        print(f"allocator variables in the environment: {malloc_env() or 'none'}", flush=True)
        rows = disk_rows(args)
        print("\nTeacher memory per rank from safetensors on disk (MiB above the rank's base; anon = RssAnon, file = "
              "RssFile; held = the rank's parameters + buffers)")  # fmt: skip
        print(f"{'teacher':<11}{'dtype':<6}{'TP':>3}{'held':>9}{'load anon pk':>14}{'x held':>8}{'fwd anon pk':>13}"
              f"{'steady anon':>13}{'load file pk':>14}{'steady file':>13}")  # fmt: skip
        for r in rows:
            print(f"{r['teacher']:<11}{r['dtype']:<6}{r['tp']:>3}{r['held_mib']:>9.0f}{r['load_anon_peak_mib']:>14.0f}"
                  f"{r['load_peak_over_held']:>8.2f}{r['forward_anon_peak_mib']:>13.0f}{r['steady_anon_mib']:>13.0f}"
                  f"{r['load_file_peak_mib']:>14.0f}{r['steady_file_mib']:>13.0f}")  # fmt: skip
        cmd_args = sys.argv[1:] if argv is None else argv
        result = {"command": "PYTHONPATH=. python benchmarks/memory.py " + " ".join(cmd_args),
                  "environment": environment(), "teachers": DISK_TEACHERS,
                  "malloc_env": malloc_env(), "disk_rows": rows}  # fmt: skip
        if args.json_out:
            os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=1)
        return result

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
