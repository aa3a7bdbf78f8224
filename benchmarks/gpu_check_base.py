"""What every phase of the GPU check shares: the models' shapes, the memory meter, the environment, and ``setup``,
which builds the teacher, student and batch a phase runs on (``benchmarks/gpu_check.py`` calls it, then the phases)::

    ctx = setup(args)            # ctx["teacher"], ctx["student"], ctx["batch"], ctx["mem"], ctx["log"], ...
"""

import gc
import json
import math
import os
import subprocess
import time
from typing import Dict, List, Optional

import torch

import common
from step_cost import make_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def llama_config(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=2048,
                       num_labels=2, pad_token_id=0)  # fmt: skip


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


def setup(args) -> dict:
    """Process group, environment, the teacher (``DeepSpeedTeacher``, tp_size = world size), the student and the
    batch: what the phases share. With the ``teacher_checks`` phase to come, the teacher's weights are first saved as
    sharded safetensors (``ctx["teacher_dir"]``) for the sharded loader's check."""
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
    log(f"gpu_check ({args.mode}, {' '.join(args.phases)}): {json.dumps({k: env.get(k) for k in keys})}")

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    before = mem.allocated()
    with torch.device(device):  # random init where it will run: a BERT-large init on the CPU takes seconds
        model_t = BertForSequenceClassification(bert_config(*shapes["teacher"], attn="eager"))
    os.makedirs(args.out_dir, exist_ok=True)
    teacher_dir = None
    if "teacher_checks" in args.phases:  # the same weights as safetensors, for the sharded loader's check
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
    return {
        "mem": mem, "device": device, "batch": batch, "teacher": teacher, "teacher_config": teacher_config,
        "teacher_weights_mib": teacher_weights_mib, "student": student, "global_batch": args.batch_size * world,
        "cached_raw": {False: TeacherOutput(deep_raw.logits), True: deep_raw},
        "world": world, "rank": rank, "log": log, "env": env, "teacher_info": teacher_info,
        "reference_logits": deep_raw.logits, "teacher_dir": teacher_dir,
    }
