"""Stable hashes of what a cache depends on: ``fingerprint({"teacher": model, "vocab": ..., "max_length": 128})``.

    key = fingerprint({"teacher": state_dict_hash(model), "data": data_hash, "max_length": 128})

A module hashes its state_dict (names, dtypes, shapes, bytes), a tensor its bytes, and everything else its JSON.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Union

import torch


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


def canonical(obj: Any) -> Any:
    if isinstance(obj, torch.nn.Module):
        return {"state_dict_sha256": state_dict_hash(obj)}
    if torch.is_tensor(obj):
        return {"tensor_sha256": _tensor_digest(obj)}
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
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
    return hashlib.sha256(json.dumps(canonical(obj), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
