"""Loading a tensor-parallel teacher shard by shard, and the per-head parameters AutoTP leaves whole::

    files = checkpoint_files("teachers/bert-large-mnli")       # safetensors only: [("model-00001-of-00002...", keys)]
    skeleton = empty_classifier("teachers/bert-large-mnli")     # parameters on meta, buffers real
    check_keys_cover(skeleton, files)                           # one clear line when the checkpoint lacks a tensor
    kwargs = ds_checkpoint_kwargs(path, files, scratch_dir)      # checkpoint=..., base_dir=... for init_inference
    ...
    shard_head_parameters(engine.module, rank, tp_size)         # MPNet's relative-position bias -> this rank's heads

Used by :meth:`~ad2_ds.teachers.ds_inference.DeepSpeedTeacher.from_pretrained`. DeepSpeed's AutoTP loader
(``init_inference(..., checkpoint={"type": "ds_model", ...})``) reads one safetensors file at a time into memory,
fills the modules of that file (only ``nn.Linear``, ``nn.Embedding`` and LayerNorm/RMSNorm-like modules) and shards
them at once, so a rank's peak holds one file plus its own shards, never the whole model. Three things it does not
do, handled here:

- A module whose tensors sit in two files (HF's ``max_shard_size`` cuts between tensors, e.g. a weight and its bias)
  is filled from the first file only, sharded, and never completed: its other tensors stay on meta. The split modules'
  tensors are copied into one small bridge file that is loaded first.
- A parameter held by any other module (a bare ``nn.Parameter`` on an attention block, say) is never loaded:
  :func:`sharded_load_blocker` names it before anything is loaded and the caller falls back to a whole-model load.
- Non-persistent buffers (``position_ids``, BERT's ``token_type_ids``) are not in the checkpoint: the skeleton is built
  with ``accelerate.init_empty_weights(include_buffers=False)`` so they are computed for real (``deepspeed.OnDevice``
  puts them on meta and they come back as garbage).
"""

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def checkpoint_files(path) -> List[Tuple[str, List[str]]]:
    """The safetensors files of a checkpoint folder and the tensor names in each: from the sharded index
    (``model.safetensors.index.json``) when there is one, else ``model.safetensors``. ``.bin`` checkpoints are
    refused: they are unpickled whole, so every rank would hold the whole model."""
    from safetensors import safe_open

    path = Path(path)
    if (path / SAFE_INDEX).is_file():
        weight_map = json.loads((path / SAFE_INDEX).read_text())["weight_map"]
        by_file: Dict[str, List[str]] = defaultdict(list)
        for key, file in weight_map.items():
            by_file[file].append(key)
        missing = [f for f in by_file if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"sharded teacher load: {path / SAFE_INDEX} names missing files: {missing}")
        return sorted((f, sorted(keys)) for f, keys in by_file.items())
    if (path / SAFE_SINGLE).is_file():
        with safe_open(str(path / SAFE_SINGLE), framework="pt") as f:
            return [(SAFE_SINGLE, sorted(f.keys()))]
    found = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
    if found:
        raise ValueError(
            f"sharded teacher load: {path} holds only .bin weights ({found[0]}, ...), which are unpickled whole on "
            "every rank; re-save the teacher as safetensors (model.save_pretrained(dir), the default) to load it "
            "shard by shard"
        )
    raise FileNotFoundError(f"sharded teacher load: no {SAFE_SINGLE} nor {SAFE_INDEX} in {path}")


def empty_classifier(path, num_labels: Optional[int] = None, trust_remote_code: bool = False, **config_kwargs):
    """The teacher's ``AutoModelForSequenceClassification`` with its parameters on the meta device (no memory) and
    its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if num_labels is not None and config.num_labels != num_labels:
        raise ValueError(f"sharded teacher load: {path} predicts {config.num_labels} labels, expected {num_labels}")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForSequenceClassification.from_config(
            config, trust_remote_code=trust_remote_code, **config_kwargs
        )
    return model.eval()


def _is_loaded_by_deepspeed(module: nn.Module) -> bool:
    from deepspeed.module_inject.auto_tp import Loading

    return isinstance(module, nn.Linear) or Loading.is_load_module(module)


def sharded_load_blocker(model: nn.Module) -> Optional[str]:
    """Why DeepSpeed's shard loader cannot fill ``model`` (a parameter in a module it does not load), or None."""
    for mod_name, module in model.named_modules():
        if _is_loaded_by_deepspeed(module):
            continue
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            where = f"{mod_name}.{own[0]}" if mod_name else own[0]
            return f"parameter {where} is held by a {type(module).__name__}, which DeepSpeed's loader does not fill"
    return None


def check_keys_cover(model: nn.Module, files: Sequence[Tuple[str, List[str]]], path="") -> None:
    """Raise one clear line when the checkpoint lacks a parameter or persistent buffer of ``model``."""
    have = {k for _, keys in files for k in keys}
    want = set(model.state_dict().keys())
    missing = sorted(want - have)
    if missing:
        raise ValueError(
            f"sharded teacher load: the checkpoint {path} lacks {len(missing)} of the model's {len(want)} tensors "
            f"(first: {missing[:3]}); is it a {type(model).__name__} checkpoint?"
        )


def _split_modules(files: Sequence[Tuple[str, List[str]]]) -> Dict[str, List[Tuple[str, str]]]:
    """Modules (by name prefix) whose tensors are spread over several files: {module: [(file, key), ...]}."""
    where: Dict[str, List[Tuple[str, str]]] = defaultdict(list)
    for file, keys in files:
        for key in keys:
            where[key.rpartition(".")[0]].append((file, key))
    return {m: fk for m, fk in where.items() if len({f for f, _ in fk}) > 1}


def ds_checkpoint_kwargs(path, files: Sequence[Tuple[str, List[str]]], scratch_dir) -> dict:
    """``checkpoint`` and ``base_dir`` for ``deepspeed.init_inference``. When a module's tensors are spread over
    several files, they are copied into ``scratch_dir/bridge.safetensors`` (a few tensors), listed first: DeepSpeed
    then loads and shards that module whole, and skips it in the later files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    names = [f for f, _ in files]
    split = _split_modules(files)
    if split:
        bridge: Dict[str, torch.Tensor] = {}
        for pairs in split.values():
            for file, key in pairs:
                with safe_open(str(path / file), framework="pt") as f:
                    bridge[key] = f.get_tensor(key)
        os.makedirs(scratch_dir, exist_ok=True)
        bridge_path = os.path.join(os.path.abspath(scratch_dir), "bridge.safetensors")
        save_file(bridge, bridge_path, metadata={"format": "pt"})
        names = [bridge_path] + names  # an absolute name: os.path.join(base_dir, name) keeps it
    return {"checkpoint": {"type": "ds_model", "checkpoints": names, "version": 1.0}, "base_dir": str(path)}


def meta_tensors(model: nn.Module) -> List[str]:
    """Names of the parameters and buffers still on the meta device."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [n for n, t in named if t is not None and t.is_meta]


# Per-head parameters that live outside the attention modules AutoTP shards: module names -> the dim holding heads.
# MPNet (and T5-style encoders): one Embedding(buckets, heads) for all layers, added to every layer's [B, heads, T, T]
# scores; AutoTP leaves it whole, so each rank's heads/tp scores would meet a bias over all heads.
HEAD_PARAMETERS = {"relative_attention_bias": 1}


def shard_head_parameters(model: nn.Module, rank: int, tp_size: int, num_heads: int) -> List[str]:
    """Slice every per-head parameter of :data:`HEAD_PARAMETERS` to this rank's contiguous block of heads (the block
    AutoTP gives rank ``rank`` when ``tp_size`` divides the heads). Returns the names sliced."""
    done = []
    per_rank = num_heads // tp_size
    for name, module in model.named_modules():
        dim = HEAD_PARAMETERS.get(name.rpartition(".")[2])
        if dim is None or not isinstance(module, nn.Embedding):
            continue
        weight = module.weight
        if weight.shape[dim] != num_heads:
            continue  # already sliced, or not per head
        part = weight.detach().narrow(dim, rank * per_rank, per_rank).clone()
        module.weight = nn.Parameter(part, requires_grad=False)
        module.embedding_dim = per_rank
        done.append(name)
    return done


def student_from_checkpoint(
    path, n_layers_s: int, strategy: str = "bottom", num_labels: Optional[int] = None, trust_remote_code=False, **kw
) -> nn.Module:
    """:func:`ad2_ds.modeling.student_from_teacher` of a teacher that is never built whole: the student's skeleton is
    cut from the teacher's empty one (parameters on meta), and only the tensors the student keeps (embeddings, the
    selected layers, the head) are read from the safetensors files, in fp32. Equal to cutting the loaded teacher."""
    from safetensors import safe_open

    from ..modeling import find_layer_list, num_layers, select_layers, student_from_teacher

    skeleton = empty_classifier(path, num_labels, trust_remote_code, **kw)
    keep = select_layers(num_layers(skeleton.config), n_layers_s, strategy)
    layers = find_layer_list(skeleton)
    prefix = next(name for name, module in skeleton.named_modules() if module is layers) + "."
    student = student_from_teacher(skeleton, n_layers_s, strategy)  # a copy of meta tensors: no memory

    def teacher_key(name: str) -> str:  # the student's layer i is the teacher's layer keep[i]
        if not name.startswith(prefix):
            return name
        i, rest = name[len(prefix) :].split(".", 1)
        return f"{prefix}{keep[int(i)]}.{rest}"

    wanted = {teacher_key(k): k for k in student.state_dict()}
    files = checkpoint_files(path)
    missing = sorted(set(wanted) - {k for _, keys in files for k in keys})
    if missing:
        raise ValueError(f"student from {path}: the checkpoint lacks {len(missing)} tensors (first: {missing[:3]})")
    state = {}
    for file, keys in files:
        needed = [k for k in keys if k in wanted]
        if needed:
            with safe_open(str(Path(path) / file), framework="pt") as f:
                for k in needed:
                    t = f.get_tensor(k)
                    state[wanted[k]] = t.float() if t.is_floating_point() else t
    student.load_state_dict(state, strict=False, assign=True)
    left = meta_tensors(student)
    if left:
        raise ValueError(f"student from {path}: {len(left)} tensors were not loaded (first: {left[:3]})")
    return student
