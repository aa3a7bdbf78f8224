"""The cheaper ascents of AD2: δ without an input-only backward of its own (``AD2Config.ascent``).

    AD2Config(method="ad2", ascent="clean_grad")   # δ from the gradient the clean backward sends to the embeddings
    AD2Config(method="ad2", ascent="free")         # one δ per training example, carried across epochs (Shafahi 2019)
    objective.delta_store = DeltaStore(train_ds["idx"], max_len, hidden)   # "free" only; run_distillation does it

Passes per step (forward 1, full backward 2): KD 3; ``ascent="kl"`` (today's) 7; both of these 6.

``clean_grad``: the clean terms (ce + kd + deep KD) are back-propagated first, by ``torch.autograd.grad`` over
the embedding output and every trainable parameter in one pass. The embedding-output gradient gives δ (one normalised
step η from 0, projected on the ε ball: :func:`ad2_ds.perturb.normalized_ascent_step`); the parameter gradients are
handed back to the caller's single ``loss.backward()`` / ``engine.backward(loss)`` by :class:`InjectGrad`, a zero
term whose backward adds them to the adversarial graph's. So DeepSpeed sees one backward per micro-batch, with its
own gradient-accumulation division, loss scaling and ZeRO-1/2 reduction hooks unchanged. The direction is
∇(w_ce·CE + w_kd·KL + deep terms) where ``kl`` takes ∇KL alone (the adversarial loss at δ = 0): CE pulls it towards
the labels' loss (docs/RESULTS.md measures the cosine of the two). Under fp16 the clean gradients are taken at the
engine's current loss scale S (as its own backward would, so small gradients do not underflow) and injected ÷ S:
the engine's scaled backward then gives exactly S·g. δ's normalised direction does not depend on S. ZeRO-3 is refused:
its partitioned weights cannot be differentiated by parameter outside the engine's backward.

``free``: δ of an example is read from the store (zeros on its first visit, as Shafahi et al.), used in the
adversarial forward as a leaf tensor; the caller's backward reaches it, and a hook on it takes one normalised step η
along that gradient (∝ α·∇δ ada: loss scale and gradient-accumulation factors cancel in the normalisation; a
non-finite example keeps its δ), projects on the ε ball and writes the result back. A micro-batch skipped as
non-finite runs no backward, so its δ stays. The store is run state: :mod:`ad2_ds.checkpoint` saves and restores it.
"""

import logging
import os
from typing import Optional, Sequence

import torch

from .config import ASCENTS  # noqa: F401  (re-exported: the ascents this module implements)
from .perturb import normalized_ascent_step, random_signs

logger = logging.getLogger(__name__)
DELTA_BYTES = 4  # δ is kept in fp32 (as every ascent keeps it)
DEFAULT_BUDGET_SHARE = 0.5  # of the RAM available when the run starts
_FP16_ASCENT_SCALE = 1024.0


class InjectGrad(torch.autograd.Function):
    """``InjectGrad.apply(inv_scale, n, *params, *grads)``: a zero scalar whose backward gives each param
    ``grad_output · inv_scale · grad``, i.e. adds precomputed (scaled) gradients to a later backward's."""

    @staticmethod
    def forward(ctx, inv_scale: float, n: int, *tensors):
        ctx.inv_scale, ctx.n, ctx.grads = inv_scale, n, tensors[n:]
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device)

    @staticmethod
    def backward(ctx, grad_output):
        s = grad_output.float() * ctx.inv_scale
        return (None, None, *[(s * g.float()).to(g.dtype) for g in ctx.grads], *([None] * ctx.n))


def loss_scale(objective, dtype) -> float:
    """The scale the clean gradients are taken at: the DeepSpeed engine's current fp16 loss scale when the objective
    knows its engine, a fixed 1024 for other fp16 graphs, else 1."""
    ref = objective.__dict__.get("_scaling_engine")  # a weakref set by ad2_ds.engine.build_engine
    engine = objective.engine or (ref() if ref is not None else None)
    if engine is not None and engine.fp16_enabled():
        return float(engine.optimizer.loss_scale)
    return _FP16_ASCENT_SCALE if dtype == torch.float16 else 1.0


def clean_grad_delta(objective, emb: torch.Tensor, clean_total: torch.Tensor, mask, scale=None):
    """(δ [B, T, H] fp32 detached, the clean total as a value with its parameter gradients injected) from one
    backward of ``clean_total`` (the clean terms) to ``emb`` (the tensor at δ's place of the clean forward) and every
    trainable parameter. ``scale``: the relative radius factor, as :func:`ad2_ds.perturb.pga_perturbation` takes it."""
    cfg = objective.config
    if objective.zero3_partitioned:
        raise ValueError(
            "ascent clean_grad differentiates the clean loss by parameter before the engine's backward, which "
            "ZeRO-3's partitioned weights do not allow: use ZeRO stage 0-2, or --ascent free or kl"
        )
    params = [p for p in objective.parameters() if p.requires_grad]
    s = loss_scale(objective, emb.dtype)
    grads = torch.autograd.grad(clean_total * s, [emb, *params], allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads[1:]) if g is not None]
    zero = torch.zeros(emb.shape, dtype=torch.float32, device=emb.device)
    delta = normalized_ascent_step(zero, grads[0].float(), cfg.step_size, cfg.epsilon, mask, cfg.perturb_norm, scale)
    if cfg.random_direction:
        delta = random_signs(delta)
    injected = InjectGrad.apply(1.0 / s, len(used), *[p for p, _ in used], *[g for _, g in used])
    return delta.detach(), clean_total.detach() + injected


def free_delta(objective, batch, shape, mask, scale=None) -> torch.Tensor:
    """This batch's δ from the store (a leaf that requires grad), with the hook that writes its next value back."""
    cfg, store = objective.config, objective.delta_store
    if store is None:
        raise ValueError(
            "ascent free keeps one delta per training example: set objective.delta_store = DeltaStore(...) "
            "(ad2_ds.run.run_distillation does it), or use --ascent clean_grad"
        )
    idx = batch["idx"]
    delta = store.read(idx, shape[1], mask.device).requires_grad_(True)

    def update(grad):
        new = normalized_ascent_step(delta.detach(), grad.float(), cfg.step_size, cfg.epsilon, mask,
                                     cfg.perturb_norm, scale)  # fmt: skip
        store.write(idx, new)

    delta.register_hook(update)
    return delta


class DeltaStore:
    """One δ per training example ([N, T_max, H] fp32 on the CPU, zeros until first written), keyed by the examples'
    ``idx``. Padding is on the right (the collator's), so a token keeps its position whatever the batch's length."""

    def __init__(self, ids: Sequence[int], max_len: int, hidden: int):
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        self.ids = torch.unique(ids)  # sorted
        if len(self.ids) != len(ids):
            raise ValueError("DeltaStore: the training examples' idx values are not unique")
        self.delta = torch.zeros(len(self.ids), max_len, hidden, dtype=torch.float32)
        self.visits = torch.zeros(len(self.ids), dtype=torch.long)

    @property
    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size()

    def report(self) -> dict:
        n, t, h = self.delta.shape
        return {"examples": n, "max_tokens": t, "hidden": h, "bytes": self.nbytes}

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.detach().cpu().long()
        rows = torch.searchsorted(self.ids, idx).clamp_max(len(self.ids) - 1)
        missing = self.ids[rows] != idx
        if missing.any():
            raise KeyError(f"example idx {int(idx[missing][0])} is not in the delta store (built for the train split)")
        return rows

    def read(self, idx: torch.Tensor, length: int, device=None) -> torch.Tensor:
        rows, n = self._rows(idx), min(length, self.delta.shape[1])
        out = torch.zeros(len(rows), length, self.delta.shape[2], dtype=torch.float32)
        out[:, :n] = self.delta[rows, :n]
        return out.to(device) if device is not None else out

    def write(self, idx: torch.Tensor, delta: torch.Tensor) -> None:
        rows, n = self._rows(idx), min(delta.shape[1], self.delta.shape[1])
        self.delta[rows, :n] = delta[:, :n].detach().float().cpu()
        self.visits[rows] += 1

    def state_dict(self) -> dict:
        return {"ids": self.ids, "delta": self.delta, "visits": self.visits}

    def load_state_dict(self, state: dict) -> None:
        if not torch.equal(state["ids"], self.ids) or state["delta"].shape != self.delta.shape:
            raise ValueError(
                "--resume: the checkpoint's delta store was built for other training data "
                f"({tuple(state['delta'].shape)} vs {tuple(self.delta.shape)}): resume with the same data settings"
            )
        self.delta.copy_(state["delta"])
        self.visits.copy_(state["visits"])


STORE_FILE = "delta_store.pt"


def save_store(store: Optional[DeltaStore], tag_dir: str) -> None:
    """Write the store into a checkpoint's tag folder (before ``latest`` names it: a kill leaves the old one)."""
    if store is not None:
        torch.save(store.state_dict(), os.path.join(tag_dir, STORE_FILE))


def load_store(store: Optional[DeltaStore], tag_dir: str) -> None:
    if store is None:
        return
    path = os.path.join(tag_dir, STORE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--resume: {tag_dir} holds no delta store ({STORE_FILE}); it was not a run with ascent free")
    store.load_state_dict(torch.load(path, weights_only=True))


def store_bytes(examples: int, max_tokens: int, hidden: int) -> int:
    return examples * max_tokens * hidden * DELTA_BYTES


def memory_budget(budget_gb: Optional[float]) -> tuple:
    """(bytes, how it was set): the flag's value, else a share of the RAM available now."""
    if budget_gb is not None:
        return int(budget_gb * 2**30), f"--free_delta_budget_gb {budget_gb:g}"
    import psutil

    available = psutil.virtual_memory().available
    share = f"{DEFAULT_BUDGET_SHARE:.0%} of the {available / 2**30:.1f} GiB available"
    return int(available * DEFAULT_BUDGET_SHARE), share


def _embedding_width(config) -> int:
    """The width at δ's place, read from the student's (or the teacher it is cut from) config.json alone."""
    from transformers import AutoConfig

    from .base_teachers import DEFAULT_MODEL
    from .data.assets import resolve_model

    path = resolve_model(config.student or config.teacher or DEFAULT_MODEL)
    c = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    return getattr(c, "embedding_size", None) or c.hidden_size


def check_ascent(config, splits, world_size: int) -> None:
    """Before any model loads: ascent free runs on one rank, and its store (train examples × max_seq_length × width ×
    4 bytes, an upper bound: the store is sized by the longest tokenized example) fits the memory budget."""
    from .config import ConfigError

    cfg = config.objective
    if cfg.ascent != "free" or not cfg.adversarial:
        return
    if world_size > 1:
        raise ConfigError(
            "ascent",
            "free runs on one rank: each data-parallel rank sees other examples every epoch (one global permutation "
            "per epoch), so a per-rank store would miss the examples it last saw elsewhere; use --ascent clean_grad",
        )
    n, t, h = len(splits["train"]), config.data.max_seq_length, _embedding_width(config)
    need = store_bytes(n, t, h)
    budget, source = memory_budget(cfg.free_delta_budget_gb)
    if need > budget:
        raise ConfigError(
            "free_delta_budget_gb",
            f"is exceeded: ascent free needs a delta store of {need / 2**30:.2f} GiB ({n} examples x {t} tokens x {h} "
            f"x {DELTA_BYTES} bytes) and the budget is {budget / 2**30:.2f} GiB ({source}); lower --max_seq_length "
            "or --max_train_samples, raise --free_delta_budget_gb, or use --ascent clean_grad",
        )


def attach_delta_store(objective, train_ds) -> dict:
    """Give an objective with ascent free its store for ``train_ds`` (tokenized: ``idx``, ``input_ids``); returns
    what results.json records (``{"free_delta_store": {...}}``, empty for the other ascents)."""
    cfg = objective.config
    if cfg.ascent != "free" or not cfg.adversarial:
        return {}
    student = objective.student.config
    width = getattr(student, "embedding_size", None) or student.hidden_size  # δ's place: the embedding width
    store = DeltaStore(train_ds["idx"], max(len(x) for x in train_ds["input_ids"]), width)
    objective.delta_store = store
    r = store.report()
    logger.info(
        "ascent free: delta store of %.1f MiB (%d examples x %d tokens x %d x %d bytes)",
        r["bytes"] / 2**20, r["examples"], r["max_tokens"], r["hidden"], DELTA_BYTES,
    )  # fmt: skip
    return {"free_delta_store": r}


def cheap_delta(objective, batch, inputs, emb, total, mask):
    """(δ, total) for ``objective.config.ascent`` clean_grad or free, from inside :meth:`AD2Objective.forward`:
    clean_grad hands back the clean total it back-propagated through (see :func:`clean_grad_delta`)."""
    cfg = objective.config
    rel = None
    if cfg.perturb_size == "relative":
        rel = objective._relative_scale(inputs, mask, objective._tap.reference)
    if cfg.ascent == "clean_grad":
        delta, total = clean_grad_delta(objective, emb, total, mask, rel)
    else:
        delta = free_delta(objective, batch, objective._embedding_shape(inputs), mask, rel)
    objective.last_delta = delta.detach()
    return delta, total
