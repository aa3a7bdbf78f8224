"""Reading a teacher cache: ``CachedTeacher(cache_dir, fingerprint_parts)(batch)``, looked up by ``batch["idx"]``.

    teacher = CachedTeacher("cache/sst2", fp)          # refuses a stale, incomplete or damaged cache with one line
    out = teacher(batch)                               # TeacherOutput, as the live teacher gives it

The layout is described in :mod:`ad2_ds.teachers.cache`.
"""

import json
import zlib
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..base import Teacher, TeacherOutput, teacher_inputs
from .fingerprint import canonical, fingerprint
from .layout import FORMAT_VERSION, STORAGE, STORAGE_BY_NAME, damaged_files

API_REMEDY = "rebuild it with build_teacher_cache(..., overwrite=True) or delete it"


class CachedTeacher(Teacher):
    """Teacher outputs read from a cache written by :func:`build_teacher_cache`, looked up by ``batch["idx"]``.

    expected_fingerprint: the fingerprint parts (dict) or its :func:`fingerprint` hex; a mismatch raises.
    require_hidden_layers: layers the objective needs; raises at construction when the cache lacks one.
    verify: check every row's crc32 now (one read of the whole cache), so a damaged cache is refused before training
    rather than at the row it reaches. remedy: what the error lines say to do (default: the Python API's way).
    Hidden states come back as a list over all hidden-state indices (None where not stored), each [B, T, H] with T
    the batch's (teacher) sequence length, zero past each example's real tokens (only those are stored), in ``dtype``.
    """

    output_attentions = False

    def __init__(
        self,
        cache_dir: Union[str, Path],
        expected_fingerprint: Union[str, Mapping[str, Any]],
        require_hidden_layers: Sequence[int] = (),
        dtype: torch.dtype = torch.float32,
        device=None,
        verify: bool = False,
        remedy: Optional[str] = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.remedy = remedy or API_REMEDY
        meta_path = self.cache_dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"CachedTeacher: {meta_path} does not exist: no complete cache in {self.cache_dir} (a build that did "
                "not finish leaves none); run build_teacher_cache first"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"CachedTeacher: cache format {meta.get('format')} != {FORMAT_VERSION} in {self.cache_dir}; "
                f"{self.remedy}"
            )
        want = expected_fingerprint if isinstance(expected_fingerprint, str) else fingerprint(expected_fingerprint)
        if meta["fingerprint"] != want:
            detail = ""
            if not isinstance(expected_fingerprint, str):
                stored, expected = meta.get("fingerprint_parts", {}), canonical(expected_fingerprint)
                keys = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
                detail = f" (differing: {keys})"
            raise ValueError(
                f"CachedTeacher: stale cache in {self.cache_dir}: it was built for fingerprint "
                f"{meta['fingerprint'][:12]}, this run expects {want[:12]}{detail}; {self.remedy}"
            )
        missing = sorted(set(require_hidden_layers) - set(meta["hidden_layers"]))
        if missing:
            raise ValueError(
                f"CachedTeacher: hidden layers {missing} are not in the cache {self.cache_dir} (it has "
                f"{meta['hidden_layers']}); {self.remedy}"
            )
        damaged = damaged_files(self.cache_dir, meta)
        if damaged:
            raise ValueError(f"CachedTeacher: damaged cache in {self.cache_dir}: {damaged[0]}; {self.remedy}")
        self.meta = meta
        self.dtype, self.device = dtype, device
        self.num_labels = meta["num_logits"]
        self.layers: List[int] = meta["hidden_layers"]
        self.output_hidden_states = bool(self.layers)
        self.index = np.load(self.cache_dir / "index.npy", mmap_mode="r")
        self._store_dtype = STORAGE_BY_NAME[meta["dtype"]] if self.layers else None
        self._logits, self._crc, self._tokens, self._hidden = [], [], [], []
        for shard, n in enumerate(meta["shard_rows"]):
            path = self.cache_dir / f"shard-{shard:05d}"
            if n == 0:
                for part in (self._logits, self._crc, self._tokens, self._hidden):
                    part.append(None)
                continue
            self._logits.append(np.memmap(f"{path}.logits.bin", np.float32, "r", shape=(n, meta["num_logits"])))
            self._crc.append(np.memmap(f"{path}.crc.bin", np.uint32, "r", shape=(n,)))
            if self.layers:
                tokens = np.fromfile(f"{path}.tokens.bin", np.int64)
                shape = (int(tokens[-1]), len(self.layers), meta["hidden_size"])
                self._tokens.append(tokens)
                self._hidden.append(np.memmap(f"{path}.hidden.bin", STORAGE[self._store_dtype][1], "r", shape=shape))
            else:
                self._tokens.append(None)
                self._hidden.append(None)
        if verify:
            for shard, n in enumerate(meta["shard_rows"]):
                for row in range(n):
                    self._row(shard, row)

    def _row(self, shard: int, row: int):
        """(logits [C], hidden [len, L, H] or None) of one stored row, after checking its crc32."""
        logits = np.asarray(self._logits[shard][row])
        crc = zlib.crc32(logits.tobytes())
        hidden = None
        if self.layers:
            tokens = self._tokens[shard]
            hidden = np.asarray(self._hidden[shard][tokens[row] : tokens[row + 1]])
            crc = zlib.crc32(hidden.tobytes(), crc)
        if crc != int(self._crc[shard][row]):
            raise ValueError(
                f"CachedTeacher: corrupted cache in {self.cache_dir}: shard {shard} row {row} fails its crc32 check; "
                f"{self.remedy}"
            )
        return logits, hidden

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
        rows = [self._row(int(sh), int(r)) for _, sh, r in loc]
        out_logits = torch.from_numpy(np.stack([lg for lg, _ in rows])).float()
        hidden = None
        if self.layers:
            T = teacher_inputs(batch)["input_ids"].shape[1]
            H = self.meta["hidden_size"]
            h = torch.zeros(len(rows), T, len(self.layers), H, dtype=self._store_dtype)  # past a row's tokens: 0
            for b, (_, row) in enumerate(rows):
                n = min(T, row.shape[0])
                stored = torch.from_numpy(row[:n].copy())
                h[b, :n] = stored.view(torch.bfloat16) if self._store_dtype == torch.bfloat16 else stored
            h = h.to(self.dtype)
            hidden = [None] * self.meta["num_hidden_states"]
            for j, i in enumerate(self.layers):
                hidden[i] = h[:, :, j]
        out = TeacherOutput(logits=out_logits, hidden_states=hidden)
        return out.to(self.device) if self.device is not None else out
