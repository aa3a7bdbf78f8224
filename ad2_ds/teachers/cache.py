"""Precomputed teacher outputs on disk: one pass of any teacher over the training set, then a memory-mapped lookup::

    fp = {"teacher": fingerprint(teacher_model), "vocab": fingerprint(tokenizer.get_vocab()),
          "data": data_hash, "max_length": 128}
    build_teacher_cache(teacher, train_loader, "cache/sst2", fp, hidden_layers=[4, 8, 12], dtype=torch.float16)
    teacher = CachedTeacher("cache/sst2", fp)          # refuses a cache built with another fingerprint
    out = teacher(batch)                               # looked up by batch["idx"]

Layout of ``cache_dir`` (each rank writes the examples it saw, keyed by the example id ``idx``)::

    shard-00000.idx.bin      int64 [n]                           example id of each row
    shard-00000.logits.bin   float32 [n, C]                      logits are small: kept in fp32
    shard-00000.hidden.bin   fp16 / bf16 (as int16) [n, L, T, H] the requested layers, padded to T = max_length
    index.npy                int64 [N, 3]                        (idx, shard, row), sorted by idx
    meta.json                shapes, dtype, layers, the fingerprint; written last

Every file is written to a temporary name and renamed; a cache is valid only once ``meta.json`` exists.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .. import dist
from .base import Teacher, TeacherOutput, teacher_inputs

FORMAT_VERSION = 1
_STORAGE = {torch.float16: ("float16", np.float16), torch.bfloat16: ("bfloat16", np.int16)}


def state_dict_hash(model_or_state: Union[torch.nn.Module, Mapping[str, torch.Tensor]]) -> str:
    """sha256 over a state_dict's names, dtypes, shapes and bytes (in name order)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(name.encode())
        h.update(_tensor_digest(t).encode())
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _canonical(obj: Any) -> Any:
    if isinstance(obj, torch.nn.Module):
        return {"state_dict_sha256": state_dict_hash(obj)}
    if torch.is_tensor(obj):
        return {"tensor_sha256": _tensor_digest(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"fingerprint: cannot hash a {type(obj).__name__}; pass str/int/float/dicts/lists/tensors/modules")


def fingerprint(obj: Any) -> str:
    """A stable sha256 of a JSON-like value; modules hash their state_dict, tensors their bytes.

    ``fingerprint(model)`` hashes weights, ``fingerprint(tokenizer.get_vocab())`` a vocab, and
    ``fingerprint({"teacher": ..., "vocab": ..., "data": ..., "max_length": 128})`` the whole cache key.
    """
    return hashlib.sha256(json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Rows of one rank, written into preallocated memmaps under temporary names, renamed by ``close``."""

    def __init__(self, cache_dir: Path, shard: int, capacity: int, num_logits: int, hidden_shape, storage_dtype):
        self.rows, self.capacity = 0, capacity
        self.paths, self.tmp = {}, {}
        specs = {"idx": (np.int64, (capacity,)), "logits": (np.float32, (capacity, num_logits))}
        if hidden_shape is not None:
            specs["hidden"] = (storage_dtype, (capacity, *hidden_shape))
        self.mm = {}
        for name, (dtype, shape) in specs.items():
            self.paths[name] = cache_dir / f"shard-{shard:05d}.{name}.bin"
            self.tmp[name] = cache_dir / f"shard-{shard:05d}.{name}.bin.tmp-{os.getpid()}"
            self.mm[name] = np.memmap(self.tmp[name], dtype=dtype, mode="w+", shape=shape)

    def write(self, idx: np.ndarray, logits: np.ndarray, hidden: Optional[np.ndarray]) -> None:
        n = len(idx)
        if self.rows + n > self.capacity:
            raise ValueError(
                f"build_teacher_cache: this rank saw more than num_examples={self.capacity} examples; pass the number "
                "of examples this rank's dataloader yields"
            )
        sl = slice(self.rows, self.rows + n)
        self.mm["idx"][sl] = idx
        self.mm["logits"][sl] = logits
        if hidden is not None:
            self.mm["hidden"][sl] = hidden
        self.rows += n

    def close(self) -> int:
        for name, mm in self.mm.items():
            row_bytes = mm.itemsize * int(np.prod(mm.shape[1:], dtype=np.int64))
            mm.flush()
            del mm
            with open(self.tmp[name], "r+b") as f:
                f.truncate(self.rows * row_bytes)
                os.fsync(f.fileno())
            os.replace(self.tmp[name], self.paths[name])
        self.mm = {}
        return self.rows


def _barrier(group=None) -> None:
    if dist.get_world_size() > 1:
        torch.distributed.barrier(group=group)


def _num_examples_of(dataloader) -> Optional[int]:
    for attr in ("sampler", "dataset"):
        try:
            return len(getattr(dataloader, attr))
        except (AttributeError, TypeError):
            continue
    return None


def estimate_hidden_bytes(num_examples: int, max_length: int, hidden_size: int, num_layers: int) -> int:
    """bytes = N x T x H x layers x 2 (fp16/bf16)."""
    return int(num_examples) * int(max_length) * int(hidden_size) * int(num_layers) * 2


def build_teacher_cache(
    teacher: Teacher,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    cache_dir: Union[str, Path],
    fingerprint_parts: Mapping[str, Any],
    hidden_layers: Optional[Sequence[int]] = None,
    dtype: torch.dtype = torch.float16,
    num_examples: Optional[int] = None,
    max_length: Optional[int] = None,
    max_bytes: Optional[int] = None,
    overwrite: bool = False,
) -> Path:
    """Run ``teacher`` once over ``dataloader`` (this rank's shard) and write its outputs to ``cache_dir``.

    Call on every rank (collective: barriers, and a TP teacher's own collectives). Each batch needs ``idx``.
    fingerprint_parts: what the outputs depend on (see :func:`fingerprint`); stored in meta.json.
    hidden_layers: hidden-state indices to keep (0 = embeddings); the teacher must have output_hidden_states.
    dtype: storage dtype of hidden states, torch.float16 or torch.bfloat16.
    num_examples: examples this rank will see (default: len(dataloader.sampler), else len(dataloader.dataset)).
    max_length: T of the stored hidden states (default: fingerprint_parts["max_length"]); longer batches are refused.
    max_bytes: refuse to start when the estimated hidden-state size of all ranks is larger.
    overwrite: rebuild even when a valid cache with the same fingerprint exists (otherwise it is reused as is).
    Returns the cache dir.
    """
    cache_dir = Path(cache_dir)
    if dtype not in _STORAGE:
        raise ValueError(f"build_teacher_cache: dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    layers = sorted(set(int(i) for i in hidden_layers or ()))
    if layers and not getattr(teacher, "output_hidden_states", False):
        raise ValueError("build_teacher_cache: hidden_layers requested but the teacher has output_hidden_states=False")
    if layers:
        max_length = max_length if max_length is not None else fingerprint_parts.get("max_length")
        if max_length is None:
            raise ValueError("build_teacher_cache: hidden_layers need max_length (or fingerprint_parts['max_length'])")
    fp = fingerprint(fingerprint_parts)
    meta_path = cache_dir / "meta.json"
    rank, world = dist.get_rank(), dist.get_world_size()
    cache_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    if not overwrite and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        same = (meta.get("fingerprint"), meta.get("hidden_layers"), meta.get("dtype"), meta.get("max_length"))
        if same == (fp, layers, _STORAGE[dtype][0], int(max_length) if layers else None):
            return cache_dir
    _barrier()  # every rank has read the old meta before rank 0 removes it
    if rank == 0 and meta_path.exists():
        meta_path.unlink()  # the old cache is invalid from here on
    _barrier()

    capacity = num_examples if num_examples is not None else _num_examples_of(dataloader)
    if capacity is None:
        raise ValueError("build_teacher_cache: cannot tell how many examples this rank sees; pass num_examples")
    writer: Optional[_ShardWriter] = None
    num_hidden_states = num_logits = hidden_size = None
    for batch in dataloader:
        if "idx" not in batch:
            raise KeyError("build_teacher_cache: batches need an 'idx' (example id) entry")
        out = teacher(batch)
        idx = batch["idx"].detach().cpu().numpy().astype(np.int64)
        logits = out.logits.detach().float().cpu().numpy()
        hidden = None
        if layers:
            hs = out.hidden_states
            if hs is None or max(layers) >= len(hs) or any(hs[i] is None for i in layers):
                raise ValueError(f"build_teacher_cache: the teacher returned no hidden states for layers {layers}")
            B, T, H = hs[layers[0]].shape
            if T > max_length:
                raise ValueError(f"build_teacher_cache: a batch has sequence length {T} > max_length={max_length}")
            stacked = torch.zeros(B, len(layers), max_length, H, dtype=dtype)
            for j, i in enumerate(layers):
                stacked[:, j, :T] = hs[i].detach().to("cpu", dtype)
            hidden = stacked.view(torch.int16).numpy() if dtype == torch.bfloat16 else stacked.numpy()
            num_hidden_states, hidden_size = len(hs), H
        if writer is None:
            num_logits = logits.shape[1]
            if layers:
                total = capacity * world
                est = estimate_hidden_bytes(total, max_length, hidden_size, len(layers))
                if dist.is_main_process():
                    print(
                        f"teacher cache: hidden states need about {est / 2**30:.3f} GiB ({est} bytes = N {total} x "
                        f"T {max_length} x H {hidden_size} x layers {len(layers)} x 2) in {cache_dir}",
                        flush=True,
                    )
                if max_bytes is not None and est > max_bytes:
                    raise ValueError(f"build_teacher_cache: estimated {est} bytes > max_bytes={max_bytes}")
            writer = _ShardWriter(
                cache_dir,
                rank,
                capacity,
                num_logits,
                (len(layers), max_length, hidden_size) if layers else None,
                _STORAGE[dtype][1],
            )
        writer.write(idx, logits, hidden)
    rows = writer.close() if writer is not None else 0
    # Ranks that saw no batch still need the shape information for the meta; take it from the others.
    info = {"rows": rows, "num_logits": num_logits, "num_hidden_states": num_hidden_states, "hidden_size": hidden_size}
    infos = [info]
    if world > 1:
        infos = [None] * world
        torch.distributed.all_gather_object(infos, info)
    if rank == 0:
        _write_index_and_meta(cache_dir, infos, fp, fingerprint_parts, layers, dtype, max_length)
    _barrier()
    return cache_dir


def _write_index_and_meta(cache_dir, infos, fp, fingerprint_parts, layers, dtype, max_length) -> None:
    ids, shards, rows = [], [], []
    for shard, info in enumerate(infos):
        n = info["rows"]
        if n == 0:
            continue
        shard_ids = np.fromfile(cache_dir / f"shard-{shard:05d}.idx.bin", dtype=np.int64, count=n)
        ids.append(shard_ids)
        shards.append(np.full(n, shard, dtype=np.int64))
        rows.append(np.arange(n, dtype=np.int64))
    index = np.stack([np.concatenate(a) if a else np.zeros(0, np.int64) for a in (ids, shards, rows)], axis=1)
    # Stable sort keeps the first occurrence of an id first (a padded DistributedSampler repeats a few examples).
    index = index[np.argsort(index[:, 0], kind="stable")]
    keep = np.ones(len(index), dtype=bool)
    keep[1:] = index[1:, 0] != index[:-1, 0]
    index = index[keep]
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix="index.npy.tmp-", suffix=".npy")
    os.close(fd)
    np.save(tmp, index)
    os.replace(tmp, cache_dir / "index.npy")
    first = next((i for i in infos if i["num_logits"] is not None), {})
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "fingerprint_parts": json.loads(json.dumps(_canonical(fingerprint_parts))),
        "num_examples": int(len(index)),
        "shard_rows": [int(i["rows"]) for i in infos],
        "num_logits": first.get("num_logits"),
        "hidden_layers": layers,
        "num_hidden_states": first.get("num_hidden_states"),
        "hidden_size": first.get("hidden_size"),
        "max_length": int(max_length) if layers else None,
        "dtype": _STORAGE[dtype][0],
    }
    _atomic_write_bytes(cache_dir / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())


class CachedTeacher(Teacher):
    """Teacher outputs read from a cache written by :func:`build_teacher_cache`, looked up by ``batch["idx"]``.

    expected_fingerprint: the fingerprint parts (dict) or its :func:`fingerprint` hex; a mismatch raises.
    require_hidden_layers: layers the objective needs; raises at construction when the cache lacks one.
    Hidden states come back as a list over all hidden-state indices (None where not stored), each [B, T, H] with T
    the batch's (teacher) sequence length (cropped, or zero-padded past the stored max_length), in ``dtype``.
    """

    output_attentions = False

    def __init__(
        self,
        cache_dir: Union[str, Path],
        expected_fingerprint: Union[str, Mapping[str, Any]],
        require_hidden_layers: Sequence[int] = (),
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"CachedTeacher: {meta_path} does not exist: no complete cache in {self.cache_dir} (a build that did "
                "not finish leaves none); run build_teacher_cache first"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"CachedTeacher: cache format {meta.get('format')} != {FORMAT_VERSION}; rebuild the cache"
            )
        want = expected_fingerprint if isinstance(expected_fingerprint, str) else fingerprint(expected_fingerprint)
        if meta["fingerprint"] != want:
            detail = ""
            if not isinstance(expected_fingerprint, str):
                stored, expected = meta.get("fingerprint_parts", {}), _canonical(expected_fingerprint)
                keys = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
                detail = f" (differing: {keys})"
            raise ValueError(
                f"CachedTeacher: stale cache in {self.cache_dir}: it was built for fingerprint "
                f"{meta['fingerprint'][:12]}, this run expects {want[:12]}{detail}; "
                "rebuild it with build_teacher_cache(..., overwrite=True)"
            )
        missing = sorted(set(require_hidden_layers) - set(meta["hidden_layers"]))
        if missing:
            raise ValueError(
                f"CachedTeacher: hidden layers {missing} are not in the cache (it has {meta['hidden_layers']})"
            )
        self.meta = meta
        self.dtype, self.device = dtype, device
        self.num_labels = meta["num_logits"]
        self.layers: List[int] = meta["hidden_layers"]
        self.output_hidden_states = bool(self.layers)
        self.index = np.load(self.cache_dir / "index.npy", mmap_mode="r")
        store_dtype = torch.bfloat16 if meta["dtype"] == "bfloat16" else torch.float16
        self._store_dtype = store_dtype
        self._logits, self._hidden = [], []
        for shard, n in enumerate(meta["shard_rows"]):
            path = self.cache_dir / f"shard-{shard:05d}"
            if n == 0:
                self._logits.append(None)
                self._hidden.append(None)
                continue
            self._logits.append(np.memmap(f"{path}.logits.bin", np.float32, "r", shape=(n, meta["num_logits"])))
            if self.layers:
                shape = (n, len(self.layers), meta["max_length"], meta["hidden_size"])
                self._hidden.append(np.memmap(f"{path}.hidden.bin", _STORAGE[store_dtype][1], "r", shape=shape))
            else:
                self._hidden.append(None)

    def __len__(self) -> int:
        return len(self.index)

    def _locate(self, idx: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.index[:, 0], idx)
        pos_c = np.minimum(pos, len(self.index) - 1)
        found = (pos < len(self.index)) & (np.asarray(self.index[pos_c, 0]) == idx) if len(self.index) else pos < 0
        if not found.all():
            raise KeyError(
                f"CachedTeacher: example ids {idx[~found][:10].tolist()} are not in the cache {self.cache_dir} "
                f"({len(self.index)} examples); was it built on this data and split?"
            )
        return np.asarray(self.index[pos_c])

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> TeacherOutput:
        if "idx" not in batch:
            raise KeyError("CachedTeacher: the batch has no 'idx' (example id) entry")
        idx = batch["idx"].detach().cpu().numpy().astype(np.int64).reshape(-1)
        loc = self._locate(idx)
        logits = np.stack([self._logits[s][r] for _, s, r in loc])
        out_logits = torch.from_numpy(logits).float()
        hidden = None
        if self.layers:
            T = teacher_inputs(batch)["input_ids"].shape[1]
            T_stored = self.meta["max_length"]
            rows = np.stack([self._hidden[s][r, :, : min(T, T_stored)] for _, s, r in loc])  # [B, L, T', H]
            h = torch.from_numpy(rows)
            h = h.view(torch.bfloat16) if self._store_dtype == torch.bfloat16 else h
            h = h.to(self.dtype)
            if T > T_stored:
                h = torch.nn.functional.pad(h, (0, 0, 0, T - T_stored))
            hidden = [None] * self.meta["num_hidden_states"]
            for j, i in enumerate(self.layers):
                hidden[i] = h[:, j]
        out = TeacherOutput(logits=out_logits, hidden_states=hidden)
        return out.to(self.device) if self.device is not None else out


def build_cache_for_dataset(
    live: Teacher,
    dataset,
    collator,
    cache_dir: Union[str, Path],
    fingerprint_parts: Mapping[str, Any],
    hidden_layers: Optional[Sequence[int]] = None,
    dtype: torch.dtype = torch.float16,
    batch_size: int = 64,
    group=None,
) -> None:
    """One teacher pass over a tokenized ``dataset`` into ``cache_dir``, every rank of ``group`` taking its shard.

    Shards are equal in length (wrapped around; a repeated id is stored once): tensor-parallel ranks must call the
    teacher equally often. Each shard runs longest first, so a batch of 64 pads little (outputs are stored by example
    id: the order is free); in index order a batch pads to its longest of 64 random sentences, which on
    movie-polarity doubled the build time.
    """
    from ..data.glue import example_lengths

    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    n = len(dataset)
    shard = [i % n for i in range(rank, world_size * -(-n // world_size), world_size)]
    lengths = example_lengths(dataset)
    shard.sort(key=lambda i: -lengths[i])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=batch_size, collate_fn=collator
    )
    build_teacher_cache(
        live,
        loader,
        cache_dir,
        fingerprint_parts,
        hidden_layers=list(hidden_layers) if hidden_layers else None,
        dtype=dtype,
        num_examples=len(shard),
    )
