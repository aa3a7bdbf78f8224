"""Filling a tensor-parallel teacher's own shards from safetensors, straight into the storage it keeps::

    buffers = snapshot_buffers(skeleton)                  # before init_inference: its to_empty wipes them
    engine = deepspeed.init_inference(skeleton, ...)      # AutoTP shards the meta skeleton, then allocates the shards
    fill_from_checkpoint(engine.module, path, files, buffers)
    release_freed_memory()                                # glibc: hand back what loading freed

Used by :meth:`~ad2_ds.teachers.ds_inference.DeepSpeedTeacher.from_pretrained`. DeepSpeed's own checkpoint loader
(``init_inference(checkpoint=...)``) builds every module at full size in the target dtype, copies the whole tensor in
and only then cuts the rank's shard out of it; the full-size temporaries it frees stay in glibc's heap, so a rank's
anonymous peak was about twice what it holds (BERT-base bf16 at TP=2: +248 MiB for 128 held, docs/RESULTS.md). Here
the skeleton goes through ``init_inference`` without a checkpoint: AutoTP shards the meta tensors (no memory) and the
engine allocates each kept tensor once, at its final (sharded) shape and dtype. Each tensor is then read with
``safe_open(...).get_slice`` in pieces of at most :data:`CHUNK_BYTES` of the checkpoint's dtype, only the rows and
columns of this rank's shard, and cast into place by ``copy_``: no full-size tensor, fp32 or not, ever exists.

What AutoTP did to each tensor is read from the layer it left (:func:`shard_of`): a column-parallel ``LinearLayer``
holds the rank's block of rows of its weight and bias, a row-parallel ``LinearAllreduce`` the rank's block of columns
of its weight and the whole bias (``_partition_sizes[tp_index]`` wide, at ``sum(_partition_sizes[:tp_index])``:
uneven splits included). Any other TP layer (fused QKV, GLM's gate-up pack, ...) raises :class:`UnsupportedLayout`
before anything is read, and the caller falls back to DeepSpeed's own loader. Every other tensor is read whole.
Buffers not in the checkpoint (``position_ids``, rotary ``inv_freq``) are restored from the skeleton's real ones.
"""

import ctypes
import ctypes.util
import platform
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

# Largest piece of a checkpoint tensor read at once (in the checkpoint's dtype): bounds the loader's temporaries.
CHUNK_BYTES = 4 * 2**20

_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


class UnsupportedLayout(ValueError):
    """AutoTP left a layer whose shard this loader cannot describe (the caller uses DeepSpeed's loader instead)."""


class Shard(NamedTuple):
    """Where a kept tensor comes from: ``dim`` None: the whole checkpoint tensor; else ``length`` entries of ``dim``
    starting at ``start``, out of ``full`` (the checkpoint tensor's size along ``dim``)."""

    dim: Optional[int] = None
    start: int = 0
    length: int = 0
    full: int = 0


def _split_of(layer, dim: int) -> Shard:
    sizes, index = getattr(layer, "_partition_sizes", None), getattr(layer, "tp_index", None)
    if sizes is None or index is None:
        raise UnsupportedLayout(f"{type(layer).__name__} has no _partition_sizes/tp_index (another DeepSpeed version)")
    return Shard(dim, int(sum(sizes[:index])), int(sizes[index]), int(sum(sizes)))


def shard_of(layer: nn.Module, name: str) -> Shard:
    """The part of checkpoint tensor ``name`` (a parameter's own name: ``weight``, ``bias``) that ``layer`` holds."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, TensorParallel_Layer

    if type(layer) is LinearLayer:  # column parallel: output rows (and the bias) split
        return _split_of(layer, 0)
    if type(layer) is LinearAllreduce:  # row parallel: input columns split; the bias is added after the all-reduce
        return _split_of(layer, 1) if name == "weight" else Shard()
    if isinstance(layer, TensorParallel_Layer):
        raise UnsupportedLayout(f"AutoTP layer {type(layer).__name__} is not a plain column or row split")
    return Shard()


def snapshot_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of the model's real buffers (the skeleton's are computed for real; they are small)."""
    return {n: b.detach().clone() for n, b in model.named_buffers() if b is not None and not b.is_meta}


def fill_plan(module: nn.Module) -> Dict[str, Tuple[torch.Tensor, Shard]]:
    """Every parameter and buffer of the sharded ``module`` by name: the tensor to fill and what it holds of the
    checkpoint tensor of that name. Raises :class:`UnsupportedLayout` before anything is read."""
    plan = {}
    named = [("p", n, t) for n, t in module.named_parameters()] + [("b", n, t) for n, t in module.named_buffers()]
    for kind, name, tensor in named:
        if tensor is None:
            continue
        owner, _, own = name.rpartition(".")
        plan[name] = (tensor, shard_of(module.get_submodule(owner), own) if kind == "p" else Shard())
    return plan


def _index(shard: Shard, rows: Tuple[int, int], ndim: int) -> tuple:
    """The ``get_slice`` index of rows ``rows`` (of the kept tensor's dim 0) of this shard."""
    first = shard.start if shard.dim == 0 else 0
    index = [slice(first + rows[0], first + rows[1])] + [slice(None)] * (ndim - 1)
    if shard.dim is not None and shard.dim > 0:
        index[shard.dim] = slice(shard.start, shard.start + shard.length)
    return tuple(index)


def copy_chunk(dst: torch.Tensor, src: torch.Tensor) -> None:
    """One piece into place, cast to ``dst``'s dtype by ``copy_`` (no temporary of ``dst``'s size)."""
    dst.copy_(src)


def read_into(dst: torch.Tensor, piece, shard: Shard, key: str, chunk_bytes: Optional[int] = None) -> None:
    """Fill ``dst`` from the safetensors slice ``piece`` of checkpoint tensor ``key``, ``chunk_bytes`` at a time
    (default :data:`CHUNK_BYTES`; a piece is never less than one row of ``dst``)."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    shape = list(piece.get_shape())
    want = list(dst.shape)
    if shard.dim is not None:
        want[shard.dim] = shard.full
        if shard.length != dst.shape[shard.dim]:
            raise ValueError(f"{key}: the layer holds {dst.shape[shard.dim]} of dim {shard.dim}, its split says "
                             f"{shard.length}")  # fmt: skip
    if shape != want:
        raise ValueError(f"the checkpoint's {key} has shape {shape}, the model expects {want}")
    if dst.dim() == 0:
        copy_chunk(dst, piece[()])
        return
    row_bytes = dst[0].numel() * _ITEMSIZE.get(piece.get_dtype(), 8) if dst.shape[0] else 1
    step = max(1, chunk_bytes // max(1, row_bytes))
    for r0 in range(0, dst.shape[0], step):
        r1 = min(r0 + step, dst.shape[0])
        copy_chunk(dst[r0:r1], piece[_index(shard, (r0, r1), dst.dim())])


@torch.no_grad()
def fill_from_checkpoint(
    module: nn.Module,
    path,
    files: Sequence[Tuple[str, List[str]]],
    buffers: Dict[str, torch.Tensor],
    chunk_bytes: Optional[int] = None,
) -> List[str]:
    """Fill every parameter and buffer of the sharded ``module`` (allocated, not yet written) from the safetensors
    ``files`` of ``path`` (:func:`~ad2_ds.teachers.sharded.checkpoint_files`), buffers missing from the checkpoint
    from ``buffers`` (:func:`snapshot_buffers`). Returns the names read from the checkpoint; raises when a tensor is
    left unwritten."""
    from safetensors import safe_open

    plan = fill_plan(module)
    read = []
    for file, keys in files:
        keys = [k for k in keys if k in plan]
        if not keys:
            continue
        with safe_open(str(Path(path) / file), framework="pt") as f:
            for key in keys:
                tensor, shard = plan.pop(key)
                read_into(tensor, f.get_slice(key), shard, key, chunk_bytes)
                read.append(key)
    for name in [n for n in plan if n in buffers]:
        plan.pop(name)[0].copy_(buffers[name])
    if plan:
        raise RuntimeError(f"sharded teacher load: {len(plan)} tensors are in neither the checkpoint nor the "
                           f"skeleton's buffers (first: {sorted(plan)[:3]})")  # fmt: skip
    return read


def release_freed_memory() -> bool:
    """Ask glibc to hand the heap it keeps after frees back to the system (``malloc_trim(0)``); False elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    trim = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True
