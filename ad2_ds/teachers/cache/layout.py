"""The cache's files and their checks, shared by the writer (:mod:`.build`) and the reader (:mod:`.read`)::

    with build_lock(cache_dir):            # one job builds a cache at a time; the others wait, then reuse it
        problems = damaged_files(cache_dir, meta)   # shard files whose size is not what meta.json recorded

The layout itself is described in :mod:`ad2_ds.teachers.cache`.
"""

import os
from pathlib import Path
from typing import Any, List, Mapping

import numpy as np
import torch

from ...utils import exclusive

FORMAT_VERSION = 2  # 2: real tokens only, per-row crc32, file sizes in meta.json
STORAGE = {
    torch.float32: ("float32", np.float32),
    torch.float16: ("float16", np.float16),
    torch.bfloat16: ("bfloat16", np.int16),  # numpy has no bfloat16: stored as its bits
}
STORAGE_BY_NAME = {name: dt for dt, (name, _) in STORAGE.items()}
SHARD_FILES = ("idx", "logits", "crc", "tokens", "hidden")
LOCK_FILE = ".lock"  # held while a job builds the cache (:func:`build_lock`)


def build_lock(cache_dir):
    """Held while a job checks and builds the cache in ``cache_dir``: another job building the same cache waits, then
    reuses it (:func:`ad2_ds.utils.exclusive`: re-entrant, so a caller may hold it around the build). Collective."""
    return exclusive(os.path.join(cache_dir, LOCK_FILE), "teacher cache")


def estimate_hidden_bytes(num_examples: int, max_length: int, hidden_size: int, num_layers: int, itemsize=2) -> int:
    """bytes = N x T x H x layers x itemsize; with T the mean number of real tokens per example (the cache stores no
    padding), or max_length for an upper bound."""
    return int(num_examples) * int(max_length) * int(hidden_size) * int(num_layers) * int(itemsize)


def bytes_per_example(num_logits: int, mean_tokens: float = 0.0, num_layers: int = 0, hidden_size: int = 0,
                      itemsize: int = 2) -> float:  # fmt: skip
    """On-disk bytes of one cached example: id (8) + crc (4) + fp32 logits, and with hidden states a token offset (8)
    and mean_tokens x layers x hidden_size x itemsize."""
    fixed = 8 + 4 + 4 * num_logits
    if num_layers:
        fixed += 8 + mean_tokens * num_layers * hidden_size * itemsize
    return float(fixed)


def damaged_files(cache_dir: Path, meta: Mapping[str, Any]) -> List[str]:
    """One line per shard file whose size differs from what meta.json recorded (truncated, grown or missing)."""
    out = []
    for name, size in sorted(meta.get("files", {}).items()):
        path = cache_dir / name
        have = path.stat().st_size if path.exists() else None
        if have != size:
            state = "is missing" if have is None else f"has {have} bytes, not the {size} it was written with"
            out.append(f"{name} {state} (truncated or replaced)")
    return out
