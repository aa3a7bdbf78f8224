"""Model plumbing shared by the objective and the recipes, generic over HF encoders (BERT, RoBERTa, DistilBERT,
MPNet, ELECTRA, ...).

    emb = find_embedding_module(student)          # the module that sums token/position/segment embeddings
    with EmbeddingTap(emb) as tap: ...            # capture its output, or add δ to it
    student = student_from_teacher(teacher, 3, "bottom")
"""

import copy
import inspect
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from .batch import MODEL_INPUT_KEYS


def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF model inside a DeepSpeed engine (or DDP wrapper); the model itself otherwise."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def find_embedding_module(model: nn.Module) -> nn.Module:
    """The embedding layer g(·): the module whose child is the word-embedding table (BertEmbeddings & co.)."""
    model = unwrap_model(model)
    word = model.get_input_embeddings()
    for _, module in model.named_modules():
        if module is not model and any(child is word for child in module.children()):
            return module
    raise ValueError(
        f"{type(model).__name__}: no embedding module holds the word embeddings; AD2 needs an encoder whose "
        "embeddings live in a submodule (BertEmbeddings, RobertaEmbeddings, Embeddings, ...)"
    )


def accepted_inputs(model: nn.Module) -> frozenset:
    """Names of the standard inputs the model's forward accepts (DistilBERT/MPNet take no token_type_ids)."""
    params = inspect.signature(unwrap_model(model).forward).parameters
    return frozenset(k for k in MODEL_INPUT_KEYS if k in params)


def model_inputs(batch: Mapping[str, torch.Tensor], accepted: frozenset) -> Dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and k in accepted}


def find_embedding_layernorm(embeddings: nn.Module) -> nn.Module:
    """The LayerNorm the embedding module applies to its summed token/position/segment embeddings (FreeLB's place for
    δ is its input)."""
    norms = [m for m in embeddings.children() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm")]
    if len(norms) != 1:
        raise ValueError(
            f"{type(embeddings).__name__} has {len(norms)} LayerNorm children, not one: perturb_place='pre-ln' needs "
            "the embedding LayerNorm; use perturb_place='output'"
        )
    return norms[0]


class EmbeddingTap:
    """A hook at δ's place: the embedding module's output (``place="output"``) or the input of its LayerNorm, i.e. the
    summed embeddings (``place="pre-ln"``). Set ``delta`` to add it there ([B, T, H], any dtype: it is cast to the
    tensor's dtype inside the graph, so gradients reach a fp32 δ); set ``capture`` to keep the tensor there (made
    differentiable if the embeddings are frozen) in ``captured``. The clean tensor of the last forward without δ is
    kept, detached, in ``reference`` (for radii relative to it)."""

    def __init__(self, module: nn.Module, place: str = "output"):
        self.delta: Optional[torch.Tensor] = None
        self.capture = False
        self.captured: Optional[torch.Tensor] = None
        self.reference: Optional[torch.Tensor] = None
        self.measure = False  # record what δ really changed: ``applied`` (per-example norm) and ``applied_cosine``
        self.applied: Optional[torch.Tensor] = None
        self.applied_cosine: Optional[torch.Tensor] = None
        if place == "output":
            self._handle = module.register_forward_hook(lambda mod, args, output: self._tap(output))
        elif place == "pre-ln":
            self._handle = find_embedding_layernorm(module).register_forward_pre_hook(self._pre_hook)
        else:
            raise ValueError(f"unknown perturbation place {place!r}: choose 'output' or 'pre-ln'")

    def _pre_hook(self, module, args):
        return (self._tap(args[0]), *args[1:])

    def _tap(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta is None:
            self.reference = x.detach()
        else:
            perturbed = x + self.delta.to(x.dtype)
            if self.measure:
                # In bf16/fp16 (and for tiny ε even in fp32) x + δ rounds back to x: measure what survived.
                with torch.no_grad():
                    diff, delta = perturbed.float() - x.float(), self.delta.float()
                    self.applied = diff.flatten(1).norm(dim=1)
                    self.applied_cosine = (diff * delta).sum() / (diff.norm() * delta.norm()).clamp_min(1e-30)
            x = perturbed
        if self.capture:
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            self.captured = x
        return x

    def remove(self):
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


PREDROPOUT_ATTENTION = "ad2_eager"


def _eager_attention_predropout(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention that returns the attention probabilities *before* dropout (Hugging Face's eager returns them
    after: in train mode ~p of every row is 0, so a KL to the teacher's map has a floor of noise with no gradient).
    The output still uses the dropped-out weights, so training is unchanged. query/key/value: [B, heads, T, d]."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(dropped, value).transpose(1, 2).contiguous(), probs


def use_predropout_attention(model: nn.Module) -> str:
    """Make ``model`` return pre-dropout attention maps, and check it on a probe forward in train mode.

    Models that route attention through transformers' AttentionInterface get :func:`_eager_attention_predropout`
    (same outputs as eager, bit for bit). Others get their attention-probability dropout set to 0 (a warning says so).
    Returns what was done: "interface" or "no-dropout".
    """
    import logging

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    model = unwrap_model(model)
    AttentionInterface.register(PREDROPOUT_ATTENTION, _eager_attention_predropout)
    AttentionMaskInterface.register(PREDROPOUT_ATTENTION, eager_mask)
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(PREDROPOUT_ATTENTION)
        except (ValueError, KeyError):
            model.set_attn_implementation("eager")
    if _attention_rows_are_distributions(model):
        return "interface"
    for module in model.modules():
        drop = getattr(module, "dropout", None)
        if "Attention" in type(module).__name__ and isinstance(drop, nn.Dropout):
            drop.p = 0.0
    if not _attention_rows_are_distributions(model):
        raise ValueError(
            f"{type(model).__name__} returns no attention probabilities in train mode; use w_attention=0 "
            "(hidden-state deep KD only)"
        )
    logging.getLogger(__name__).warning(
        "%s: attention dropout set to 0 so that attention KD compares probability maps", type(model).__name__
    )
    return "no-dropout"


@torch.no_grad()
def _attention_rows_are_distributions(model: nn.Module) -> bool:
    """A train-mode probe forward (its own RNG, restored after): do the returned attention rows sum to 1?"""
    was_training = model.training
    device = next(model.parameters()).device
    ids = torch.arange(4, device=device).unsqueeze(0) % model.config.vocab_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.train()
        try:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
        finally:
            model.train(was_training)
    maps = out.attentions or ()
    return bool(maps) and all(torch.allclose(a.float().sum(-1), torch.ones(()), atol=1e-3) for a in maps)


def find_layer_list(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer layers (encoder.layer, transformer.layer, ...): the longest one whose length is
    the configured depth."""
    model = unwrap_model(model)
    depth = num_layers(model.config)
    candidates = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: no list of {depth} transformer layers found")
    return candidates[0]


def num_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layers", "num_layers"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    raise ValueError(f"{type(config).__name__} has no layer count")


def _set_num_layers(config, n: int) -> None:
    for name in ("num_hidden_layers", "n_layers", "num_layers"):
        if getattr(config, name, None) is not None:
            setattr(config, name, n)


def select_layers(n_layers_t: int, n_layers_s: int, strategy: str):
    """0-based teacher layer indices a student keeps (the paper's Table 4): skip (every k-th, ending at the top),
    bottom, or top."""
    if not 1 <= n_layers_s <= n_layers_t:
        raise ValueError(f"a student of {n_layers_s} layers cannot be selected from a {n_layers_t}-layer teacher")
    if strategy in ("skip", "uniform"):
        return [round((i + 1) * n_layers_t / n_layers_s) - 1 for i in range(n_layers_s)]
    if strategy == "bottom":
        return list(range(n_layers_s))
    if strategy == "top":
        return list(range(n_layers_t - n_layers_s, n_layers_t))
    raise ValueError(f"unknown layer selection {strategy!r}: choose skip, bottom or top")


def student_from_teacher(teacher: nn.Module, n_layers_s: int, strategy: str = "bottom") -> nn.Module:
    """A smaller copy of ``teacher``: its embeddings, head and the selected transformer layers."""
    teacher = unwrap_model(teacher)
    keep = select_layers(num_layers(teacher.config), n_layers_s, strategy)
    student = copy.deepcopy(teacher)
    layers = find_layer_list(student)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():  # keep cache indices consistent for models that use them
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    parent = dict(student.named_modules())[_parent_name(student, layers)]
    for name, child in parent.named_children():
        if child is layers:
            setattr(parent, name, kept)
    _set_num_layers(student.config, n_layers_s)
    return student


def _parent_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if any(child is target for child in module.children()):
            return name
    raise ValueError("layer list has no parent")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap_model(model).parameters())


@torch.no_grad()
def measure_latency(model: nn.Module, dev_sets, collator, batch_size: int = 32, repeats: int = 5) -> float:
    """Median milliseconds of one forward on the first ``batch_size`` dev examples (after one warm-up)."""
    import time

    ds = next(iter(dev_sets.values()))
    batch = collator([ds[i] for i in range(min(batch_size, len(ds)))])
    param = next(model.parameters(), None)  # a model without parameters of its own (a TP teacher) names its device
    device = param.device if param is not None else getattr(model, "device", torch.device("cpu"))
    inputs = {k: v.to(device) for k, v in model_inputs(batch, accepted_inputs(model)).items()}
    was_training = model.training
    model.eval()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.inference_mode():  # what serving costs: no autograd graph
            model(**inputs)
        if i:
            times.append((time.perf_counter() - t0) * 1000)
    model.train(was_training)
    return sorted(times)[len(times) // 2]


def save_pretrained_atomic(model: nn.Module, tokenizer, path: str, extra: Optional[dict] = None, group=None) -> None:
    """Save an HF folder (model + tokenizer) that replaces ``path`` only once it is complete. Collective over
    ``group`` (None: all ranks; the hosted layout's student group), whose rank 0 writes; under ZeRO-3 the partitioned
    weights are gathered."""
    import contextlib
    import json
    import os
    import shutil

    import torch.distributed as dist

    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_status") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    with gather:
        if rank == 0:
            tmp, old = path + ".tmp", path + ".old"
            shutil.rmtree(tmp, ignore_errors=True)
            state = {
                k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                for k, v in model.state_dict().items()
            }
            from .patches import save_on_this_rank

            with save_on_this_rank(model):  # transformers would write the weights on global rank 0 only
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, obj in (extra or {}).items():
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=2, default=str)
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(path):
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group)
