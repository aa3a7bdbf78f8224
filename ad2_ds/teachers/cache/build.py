"""Writing a teacher cache: one pass of a teacher over the training data into ``cache_dir``.

    build_teacher_cache(teacher, train_loader, "cache/sst2", fp, hidden_layers=[4, 8, 12], dtype=torch.float16)
    build_cache_for_dataset(live, tokenized_train, collator, "cache/sst2", fp, hidden_layers=[4, 8, 12])

Each rank writes the examples it saw into its own shard files (under temporary names, renamed when done); rank 0
then writes ``index.npy`` and, last, ``meta.json``: a cache is valid only once that exists. The layout is described in
:mod:`ad2_ds.teachers.cache`.
"""

import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ... import dist
from ...progress import progress_iter
from ..base import Teacher, teacher_inputs
from .fingerprint import canonical, fingerprint
from .layout import FORMAT_VERSION, SHARD_FILES, STORAGE, build_lock, bytes_per_example, damaged_files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Rows of one rank, appended to files under temporary names, renamed by ``close``."""

    def __init__(self, cache_dir: Path, shard: int, capacity: int, with_hidden: bool):
        self.rows, self.capacity, self.tokens = 0, capacity, 0
        names = SHARD_FILES if with_hidden else ("idx", "logits", "crc")
        self.paths = {name: cache_dir / f"shard-{shard:05d}.{name}.bin" for name in names}
        self.tmp = {name: Path(f"{path}.tmp-{os.getpid()}") for name, path in self.paths.items()}
        self.files = {name: open(path, "wb") for name, path in self.tmp.items()}  # noqa: SIM115 - closed in close()
        if with_hidden:
            self.files["tokens"].write(np.zeros(1, np.int64).tobytes())

    def write(self, idx: np.ndarray, logits: np.ndarray, hidden: Optional[List[np.ndarray]]) -> None:
        """idx [B]; logits [B, C] float32; hidden: per row [len_b, L, H] in the storage dtype, or None."""
        n = len(idx)
        if self.rows + n > self.capacity:
            raise ValueError(
                f"build_teacher_cache: this rank saw more than num_examples={self.capacity} examples; pass the number "
                "of examples this rank's dataloader yields"
            )
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        crcs = np.empty(n, np.uint32)
        for b in range(n):
            crc = zlib.crc32(logits[b].tobytes())
            if hidden is not None:
                row = np.ascontiguousarray(hidden[b])
                crc = zlib.crc32(row.tobytes(), crc)
                self.files["hidden"].write(row.tobytes())
                self.tokens += row.shape[0]
                self.files["tokens"].write(np.int64(self.tokens).tobytes())
            crcs[b] = crc
        self.files["idx"].write(np.ascontiguousarray(idx, dtype=np.int64).tobytes())
        self.files["logits"].write(logits.tobytes())
        self.files["crc"].write(crcs.tobytes())
        self.rows += n

    def close(self) -> dict:
        """Flush, rename, and return {file name: bytes}."""
        sizes = {}
        for name, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.tmp[name], self.paths[name])
            sizes[self.paths[name].name] = self.paths[name].stat().st_size
        self.files = {}
        return sizes


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


# The pass leaves torch's CPU random state as it found it: a DataLoader draws its base seed from it when it starts, so
# a run that builds the cache would otherwise train its student on other dropout masks than the same run reading it.
@torch.random.fork_rng(devices=[])
def build_teacher_cache(
    teacher: Teacher,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    cache_dir: Union[str, Path],
    fingerprint_parts: Mapping[str, Any],
    hidden_layers: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
    num_examples: Optional[int] = None,
    max_length: Optional[int] = None,
    max_bytes: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Run ``teacher`` once over ``dataloader`` (this rank's shard) and write its outputs to ``cache_dir``.

    Call on every rank (collective: barriers, and a TP teacher's own collectives). Each batch needs ``idx``.
    fingerprint_parts: what the outputs depend on (see :func:`fingerprint`); stored in meta.json.
    hidden_layers: hidden-state indices to keep (0 = embeddings); the teacher must have output_hidden_states.
    dtype: storage dtype of hidden states (float32, float16 or bfloat16); default: the teacher's own precision.
    num_examples: examples this rank will see (default: len(dataloader.sampler), else len(dataloader.dataset)).
    max_length: longest teacher sequence allowed (default: fingerprint_parts["max_length"]); longer ones are refused.
        Only real tokens are stored.
    max_bytes: refuse to go on when the size estimated from the first batch (its mean length, all ranks) is larger.
    overwrite: rebuild even when a valid cache with the same fingerprint exists (otherwise it is reused as is).
    progress: a "teacher cache" bar on the main process while the pass runs.
    Returns the cache dir.
    """
    cache_dir = Path(cache_dir)
    if dtype is not None and dtype not in STORAGE:
        raise ValueError(f"build_teacher_cache: dtype must be torch.float32, float16 or bfloat16, got {dtype}")
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
    with build_lock(cache_dir):  # another job building this cache: wait, then reuse it
        _barrier()
        if not overwrite and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            same = (meta.get("format"), meta.get("fingerprint"), meta.get("hidden_layers"), meta.get("max_length"))
            want_dtype = dtype is None or meta.get("dtype") in (None, STORAGE[dtype][0])
            if same == (FORMAT_VERSION, fp, layers, int(max_length) if layers else None) and want_dtype:
                damaged = damaged_files(cache_dir, meta)
                if not damaged:
                    return cache_dir
                if dist.is_main_process():
                    print(f"teacher cache: {damaged[0]} in {cache_dir}; rebuilding the cache", flush=True)
        _barrier()  # every rank has read the old meta before rank 0 removes it
        if rank == 0 and meta_path.exists():
            meta_path.unlink()  # the old cache is invalid from here on
        _barrier()

        capacity = num_examples if num_examples is not None else _num_examples_of(dataloader)
        if capacity is None:
            raise ValueError("build_teacher_cache: cannot tell how many examples this rank sees; pass num_examples")
        writer: Optional[_ShardWriter] = None
        num_hidden_states = num_logits = hidden_size = store = None
        total = _len_or_none(dataloader)
        for batch in progress_iter(dataloader, "teacher cache", total, show=progress and dist.is_main_process()):
            if "idx" not in batch:
                raise KeyError("build_teacher_cache: batches need an 'idx' (example id) entry")
            out = teacher(batch)
            idx = batch["idx"].detach().cpu().numpy().astype(np.int64)
            logits = out.logits.detach().float().cpu().numpy()
            rows = None
            if layers:
                hs = out.hidden_states
                if hs is None or max(layers) >= len(hs) or any(hs[i] is None for i in layers):
                    raise ValueError(f"build_teacher_cache: the teacher returned no hidden states for layers {layers}")
                B, T, H = hs[layers[0]].shape
                if T > max_length:
                    raise ValueError(f"build_teacher_cache: a batch has sequence length {T} > max_length={max_length}")
                if store is None:
                    store = dtype if dtype is not None else hs[layers[0]].dtype
                if store not in STORAGE:
                    raise ValueError(f"build_teacher_cache: cannot store hidden states of dtype {store}")
                lengths = _real_lengths(teacher_inputs(batch).get("attention_mask"), B, T)
                stacked = torch.stack([hs[i].detach().to("cpu", store) for i in layers], dim=2)  # [B, T, L, H]
                if store == torch.bfloat16:
                    stacked = stacked.view(torch.int16)
                rows = [stacked[b, :n].numpy() for b, n in enumerate(lengths)]
                num_hidden_states, hidden_size = len(hs), H
            if writer is None:
                num_logits = logits.shape[1]
                total = capacity * world
                itemsize = STORAGE[store][1]().itemsize if layers else 0
                mean_tokens = float(np.mean([r.shape[0] for r in rows])) if layers and rows else 0.0
                per_example = bytes_per_example(num_logits, mean_tokens, len(layers), hidden_size or 0, itemsize)
                est = int(per_example * total)
                if dist.is_main_process():
                    print(
                        f"teacher cache: about {per_example:.0f} bytes per example (first batch: "
                        f"{mean_tokens:.1f} real tokens x {len(layers)} layers x H {hidden_size} x {itemsize} B + "
                        f"logits), {est / 2**30:.3f} GiB for N {total} in {cache_dir}",
                        flush=True,
                    )
                if max_bytes is not None and est > max_bytes:
                    raise ValueError(f"build_teacher_cache: estimated {est} bytes > max_bytes={max_bytes}")
                writer = _ShardWriter(cache_dir, rank, capacity, bool(layers))
            writer.write(idx, logits, rows)
        sizes = writer.close() if writer is not None else {}
        # Ranks that saw no batch still need the shape information for the meta; take it from the others.
        info = {
            "rows": writer.rows if writer is not None else 0,
            "files": sizes,
            "num_logits": num_logits,
            "num_hidden_states": num_hidden_states,
            "hidden_size": hidden_size,
            "dtype": STORAGE[store][0] if store is not None else None,
        }
        infos = [info]
        if world > 1:
            infos = [None] * world
            torch.distributed.all_gather_object(infos, info)
        if rank == 0:
            _write_index_and_meta(cache_dir, infos, fp, fingerprint_parts, layers, max_length)
        _barrier()
        return cache_dir


def _len_or_none(items) -> Optional[int]:
    try:
        return len(items)
    except TypeError:
        return None


def _real_lengths(mask: Optional[torch.Tensor], B: int, T: int) -> List[int]:
    """Real tokens per row of a right-padded batch (its attention mask), T each without a mask."""
    if mask is None:
        return [T] * B
    mask = mask.detach().cpu()
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(mask.bool(), prefix):
        raise ValueError("build_teacher_cache: the teacher's attention mask is not right-padded; the cache stores "
                         "each row's first mask.sum() tokens")  # fmt: skip
    return lengths.tolist()


def _write_index_and_meta(cache_dir, infos, fp, fingerprint_parts, layers, max_length) -> None:
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
    files = {name: size for info in infos for name, size in info["files"].items()}
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "fingerprint_parts": json.loads(json.dumps(canonical(fingerprint_parts))),
        "num_examples": int(len(index)),
        "shard_rows": [int(i["rows"]) for i in infos],
        "num_logits": first.get("num_logits"),
        "hidden_layers": layers,
        "num_hidden_states": first.get("num_hidden_states"),
        "hidden_size": first.get("hidden_size"),
        "max_length": int(max_length) if layers else None,
        "dtype": first.get("dtype"),
        "files": files,
        "bytes_per_example": round(sum(files.values()) / max(1, sum(int(i["rows"]) for i in infos)), 1),
    }
    _atomic_write_bytes(cache_dir / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())


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
    overwrite: bool = False,
    progress: bool = False,
) -> None:
    """One teacher pass over a tokenized ``dataset`` into ``cache_dir``, every rank of ``group`` taking its shard.

    Shards are equal in length (wrapped around; a repeated id is stored once): tensor-parallel ranks must call the
    teacher equally often. Each shard runs longest first, so a batch of 64 pads little (outputs are stored by example
    id: the order is free); in index order a batch pads to its longest of 64 random sentences, which on
    movie-polarity doubled the build time.
    """
    from ...data.glue import example_lengths

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
        overwrite=overwrite,
        progress=progress,
    )
