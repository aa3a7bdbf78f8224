"""Every place ad2-ds reaches into DeepSpeed's internals (and one of transformers'), in one module; :data:`TARGETS`
names what each patch needs.

    no_shm_op()                            # before deepspeed.init_distributed on CPU
    skip_single_rank_allreduce(engine)     # after deepspeed.initialize
    engine_pre_forward(engine)             # before calling engine.module directly
    load_weights_only(engine)              # before engine.load_checkpoint
    with default_group(group, engine): ... # DeepSpeed's world collectives on a subgroup
    reset_deepspeed_state()                # tests: forget a stale process group's state
    with save_on_this_rank(model): model.save_pretrained(path)   # a group's rank 0 that is not global rank 0

A DeepSpeed (or transformers) upgrade that renames or removes one of these targets makes :func:`missing_targets` name
the patch (``tests/test_patches.py`` fails loudly with it) instead of the patch silently doing nothing.
"""

import contextlib
import importlib
import sys
from typing import Dict, List, Tuple

import torch
import torch.distributed as tdist

# patch -> (module, attribute path) it reads or replaces; each must exist in the installed DeepSpeed.
TARGETS: Dict[str, List[Tuple[str, str]]] = {
    "no_shm_op": [("deepspeed.comm.torch", "build_shm_op")],
    "skip_single_rank_allreduce": [("deepspeed.runtime.engine", "DeepSpeedEngine.enable_backward_allreduce")],
    "engine_pre_forward": [
        ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.clear_backward_seen_flag")
    ],
    "load_weights_only": [
        ("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine", "TorchCheckpointEngine.load"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ],
    "default_group": [("deepspeed.comm.comm", "cdb"), ("deepspeed.runtime.engine", "DeepSpeedEngine.global_rank")],
    "reset_deepspeed_state": [
        ("deepspeed.comm.comm", "cdb"),
        ("deepspeed.inference.engine", "InferenceEngine.inference_mp_group"),
        ("deepspeed.utils.groups", "mpu"),
    ],
    "save_on_this_rank": [("transformers.modeling_utils", "PreTrainedModel.should_save_on_this_rank")],
}


def missing_targets() -> Dict[str, List[str]]:
    """Patch -> the targets the installed DeepSpeed lacks (empty when every patch still has what it patches).
    Instance attributes (set in ``__init__``) are looked up in the class's ``__init__`` source."""
    import inspect

    missing = {}
    for patch, targets in TARGETS.items():
        for module_name, path in targets:
            importlib.import_module(module_name)
            obj, ok = sys.modules[module_name], True
            for i, name in enumerate(path.split(".")):
                if hasattr(obj, name):
                    obj = getattr(obj, name)
                    continue
                ok = isinstance(obj, type) and i == len(path.split(".")) - 1 and _sets_attribute(obj, name, inspect)
                break
            if not ok:
                missing.setdefault(patch, []).append(f"{module_name}.{path}")
    return missing


def _sets_attribute(cls, name: str, inspect) -> bool:
    for klass in cls.__mro__:
        try:
            if f"self.{name} =" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            pass
    return False


def no_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce op on CPU (~24 s cold; it crashes TP inference
    when ``LOCAL_SIZE`` is wrong; gloo's all_reduce is correct without it). Call before ``init_distributed``."""
    # ``import deepspeed.comm.torch as m`` would give torch's module (deepspeed.comm re-exports torch); the module
    # object itself lives in sys.modules.
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def skip_single_rank_allreduce(engine) -> bool:
    """Turn off a stage-0 engine's gradient all-reduce when its data-parallel world is one rank (True if it did).
    DeepSpeed runs it even then: it flattens every gradient, all-reduces over one rank and copies them back."""
    if engine.zero_optimization_stage() != 0 or engine.dp_world_size != 1:
        return False
    engine.enable_backward_allreduce = False
    return True


def engine_pre_forward(engine) -> None:
    """The bookkeeping DeepSpeedEngine.forward does before calling its module (ZeRO's per-micro-step reset)."""
    clear = getattr(getattr(engine, "optimizer", None), "clear_backward_seen_flag", None)
    if clear is not None:
        clear()


def _safe_globals() -> list:
    """DeepSpeed's plain-data classes that its checkpoints hold (seen: ZeRO 0-3, bf16, offload), nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(engine) -> None:
    """Make the engine unpickle its checkpoint files with ``weights_only=True`` (DeepSpeed's own loader does not), so
    resuming from a checkpoint cannot run code hidden in it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine:
        return  # another checkpoint engine (e.g. Nebula): left as configured

    def load(path, map_location=None):
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load


@contextlib.contextmanager
def save_on_this_rank(model):
    """Let ``model.save_pretrained`` write on this rank. transformers 5 writes the weights and config on global rank 0
    only (``should_save_on_this_rank``); the hosted layout's student group has its rank 0 elsewhere (global rank 0
    serves the teacher), where the folder would otherwise get the tokenizer and no model. The caller has already
    picked the one rank that writes."""
    if not hasattr(model, "should_save_on_this_rank"):  # a transformers without the check: nothing to lift
        yield model
        return
    model.should_save_on_this_rank = lambda is_main_process: is_main_process  # shadows the method on this instance
    try:
        yield model
    finally:
        del model.should_save_on_this_rank


def reset_deepspeed_state() -> None:
    """Forget DeepSpeed's module-level distributed state (comm backend, cached process groups, the inference TP
    group). A forked child inherits it from the parent, and a test that ended its process group leaves it stale:
    either way it would look initialized and skip the real setup, or hand out groups that no longer exist."""
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None
    engine = sys.modules.get("deepspeed.inference.engine")
    if engine is not None:
        engine.InferenceEngine.inference_mp_group = None
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
                setattr(groups, name, {} if isinstance(value, dict) else None)
        groups.mpu = None


class _GroupAsWorld:
    """Stands in for DeepSpeed's comm backend: collectives called without a group run on ``group``, and their
    src/dst ranks are read as ranks of ``group``; everything else is forwarded unchanged."""

    def __init__(self, backend, group):
        self._backend, self._group = backend, group

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def _g(self, group):
        return self._group if group is None or group is tdist.GroupMember.WORLD else group

    def barrier(self, group=None, **kw):
        return self._backend.barrier(group=self._g(group), **kw)

    def all_reduce(self, tensor, op=tdist.ReduceOp.SUM, group=None, async_op=False):
        return self._backend.all_reduce(tensor, op, self._g(group), async_op)

    def broadcast(self, tensor, src, group=None, async_op=False):
        if group is None:
            src = tdist.get_global_rank(self._group, src)
        return self._backend.broadcast(tensor=tensor, src=src, group=self._g(group), async_op=async_op)


class default_group:
    """``with default_group(group[, engine]): ...``: DeepSpeed's barrier / all_reduce / broadcast issued without a
    group (meaning the whole world) run on ``group`` instead, ``broadcast(src=0)`` meaning the group's first rank;
    with ``engine``, its ``global_rank`` reads as the rank in ``group`` meanwhile (DeepSpeed's checkpoint code lets
    global rank 0 create the folder and write ``latest``).

    For DeepSpeed code run by a subset of the ranks that would otherwise wait for the rest of the world:
    ``init_inference`` with tp_size > 1 broadcasts an RNG state from rank 0 over the world, ``save_checkpoint``
    puts world barriers and a world all_reduce (tag check) around the save. ``group=None``: no change.
    """

    def __init__(self, group, engine=None):
        self.group, self.engine = group, engine

    def __enter__(self):
        self._comm = sys.modules.get("deepspeed.comm.comm")
        if self.group is None:
            self._comm = None
            return self
        if self._comm is not None and self._comm.cdb is not None:
            self._saved = self._comm.cdb
            self._comm.cdb = _GroupAsWorld(self._saved, self.group)
        else:
            self._comm = None
        if self.engine is not None:
            self._global_rank = self.engine.global_rank
            self.engine.global_rank = tdist.get_rank(self.group)
        return self

    def __exit__(self, *exc):
        if self._comm is not None:
            self._comm.cdb = self._saved
        if self.group is not None and self.engine is not None:
            self.engine.global_rank = self._global_rank
