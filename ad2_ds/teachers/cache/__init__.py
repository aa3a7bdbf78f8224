"""Precomputed teacher outputs on disk: one pass of any teacher over the training set, then a memory-mapped lookup::

    fp = {"teacher": fingerprint(teacher_model), "vocab": fingerprint(tokenizer.get_vocab()),
          "data": data_hash, "max_length": 128}
    build_teacher_cache(teacher, train_loader, "cache/sst2", fp, hidden_layers=[4, 8, 12], dtype=torch.float16)
    teacher = CachedTeacher("cache/sst2", fp)          # refuses a cache built with another fingerprint
    out = teacher(batch)                               # looked up by batch["idx"]

Layout of ``cache_dir`` (each rank writes the examples it saw, keyed by the example id ``idx``)::

    shard-00000.idx.bin      int64 [n]                       example id of each row
    shard-00000.logits.bin   float32 [n, C]                  logits are small: kept in fp32
    shard-00000.tokens.bin   int64 [n + 1]                   row r's tokens are hidden[tokens[r]:tokens[r + 1]]
    shard-00000.hidden.bin   fp32/fp16/bf16 (as int16) [sum of lengths, L, H]   only real tokens (no padding)
    shard-00000.crc.bin      uint32 [n]                      crc32 of row r's logits and hidden bytes
    index.npy                int64 [N, 3]                    (idx, shard, row), sorted by idx
    meta.json                shapes, dtype, layers, the fingerprint, every file's size; written last

Hidden states keep only each example's real tokens (its teacher attention mask; batches are right-padded), so a row
costs its own length, not the longest in its batch nor max_length; they are stored in the teacher's precision unless
``dtype`` asks for another. Every file is written to a temporary name and renamed; a cache is valid only once
``meta.json`` exists. Opening a cache checks every file's size against meta.json (a truncated shard is refused with
one line); reading a row checks its crc32 (a corrupted row is refused with one line, never returned as garbage).
``meta.json`` reports ``bytes_per_example``.

The package: :mod:`.layout` (file names, storage dtypes, size checks, the build lock), :mod:`.fingerprint` (cache
keys), :mod:`.build` (the writer) and :mod:`.read` (:class:`CachedTeacher`); everything is importable from here.
"""

from .build import build_cache_for_dataset, build_teacher_cache
from .fingerprint import fingerprint, state_dict_hash
from .layout import (
    FORMAT_VERSION,
    LOCK_FILE,
    SHARD_FILES,
    build_lock,
    bytes_per_example,
    damaged_files,
    estimate_hidden_bytes,
)
from .read import CachedTeacher

__all__ = [
    "CachedTeacher",
    "FORMAT_VERSION",
    "LOCK_FILE",
    "SHARD_FILES",
    "build_cache_for_dataset",
    "build_lock",
    "build_teacher_cache",
    "bytes_per_example",
    "damaged_files",
    "estimate_hidden_bytes",
    "fingerprint",
    "state_dict_hash",
]
