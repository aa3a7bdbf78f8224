"""MixKD's mixup in embedding space, the teacher labelling each mixed point: ``--mixup_alpha 0.4 [--mixup_weight 1]``.

    objective = AD2Objective(student, AD2Config(method="kd", mixup_alpha=0.4), teacher_config=teacher_model.config)
    objective.mix_teacher = MixTeacher(LocalTeacher(teacher_model))     # run.py and AD2Trainer do this
    losses = objective(batch, teacher(batch))        # total + mixup_weight * losses["mix"]

MixKD (Liang et al., ICLR 2021): example i of a batch is paired with example ``perm[i]`` (a random permutation of the
batch; it may be i itself), λ_i ~ Beta(α, α), folded to max(λ, 1 - λ) so the mixed point stays nearest its first
example (MixText's convention; the pairs are random, so the folding only fixes which example's segment ids it keeps).
Each model mixes in its own word-embedding space, with the same pairs and λ:

    inputs_embeds = λ_i e(x_i) + (1 - λ_i) e(x_perm[i])       e: the model's word embeddings (get_input_embeddings)
    attention_mask = mask_i OR mask_perm[i] (when λ_i < 1)     the longer sentence's tokens stay visible
    token_type_ids = those of x_i                              position and segment embeddings added by the model

The teacher runs on its mixed embeddings (its own tokens when the tokenizers differ: the ``teacher_*`` columns) and
its logits are the target: ``mix = kd_loss(student(mixed_s), teacher(mixed_t), t)``: MixKD's teacher-mixup KD term
(its other parts, a loss on the mixed hard labels and back-translated data, are not here). No cache can hold them
(every step makes new points), so mixup needs the teacher in this process: a ``teacher_cache``, a hosted teacher
(``teacher_ranks``) or a tensor-parallel one (``teacher_tp_size`` > 1) is refused by :func:`check_mixup_teacher`
when the RunConfig is built, before anything loads. Decoder classifiers are refused too: they pool the last
non-padding token found from ``input_ids``, which inputs_embeds do not carry.

Cost per step, on top of the method's: one student forward on the mixed batch (1 unit) and its share of the
backward (2 units), and one teacher forward on it. kd + mixup: 6 student units and 2 teacher forwards against KD's 3
and 1; ad2 + mixup: 10 and 2. λ and the pairs are drawn from torch's CPU generator, which checkpoints save, so a
resumed run draws the same.
"""

from typing import Dict, Mapping, Tuple

import torch
from torch import nn

from .losses import kd_loss


def check_mixup_teacher(run_config) -> None:
    """Raise :class:`~ad2_ds.config.ConfigError` (one line) when mixup meets a teacher that cannot label new points."""
    from .config import ConfigError

    if not run_config.objective.mixup:
        return
    why = "mixup_alpha needs the teacher's forward on each step's new mixed embeddings"
    if run_config.teacher_cache:
        raise ConfigError(
            "teacher_cache", f"holds the teacher's outputs on the training examples only, and {why}: drop "
            "teacher_cache (the teacher then runs live) or mixup_alpha",
        )  # fmt: skip
    if run_config.teacher_ranks:
        raise ConfigError("teacher_ranks", f"serve token batches only, and {why}: drop teacher_ranks or mixup_alpha")
    if run_config.teacher_tp_size > 1:
        raise ConfigError(
            "teacher_tp_size", f"> 1 runs a DeepSpeed-inference teacher that takes tokens only, and {why}: use "
            "teacher_tp_size 1 or drop mixup_alpha",
        )  # fmt: skip


def draw_mix(batch_size: int, alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(perm [B] long, lam [B] float32 in [0.5, 1]): the pairs and weights of one batch, from the CPU generator."""
    perm = torch.randperm(batch_size)
    lam = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((batch_size,))
    return perm, torch.maximum(lam, 1.0 - lam)


def mix_inputs(embeddings: nn.Module, inputs: Mapping[str, torch.Tensor], perm, lam) -> Dict[str, torch.Tensor]:
    """The model inputs of the mixed batch: ``inputs_embeds`` [B, T, H], the union of the attention masks, and the
    first example's token_type_ids when the model takes them. embeddings: the word-embedding table; inputs: the model's
    ``input_ids`` / ``attention_mask`` [/ ``token_type_ids``] ([B, T], right-padded to one length)."""
    ids = inputs["input_ids"]
    perm = perm.to(ids.device)
    emb = embeddings(ids)
    w = lam.to(device=emb.device, dtype=emb.dtype).view(-1, 1, 1)
    out = {"inputs_embeds": w * emb + (1 - w) * emb[perm]}
    if "attention_mask" in inputs:  # a partner of weight 0 (λ = 1) adds no tokens: the clean input exactly
        mask = inputs["attention_mask"]
        out["attention_mask"] = torch.maximum(mask, mask[perm] * (lam < 1).to(mask).view(-1, 1))
    if "token_type_ids" in inputs:
        out["token_type_ids"] = inputs["token_type_ids"]
    return out


class MixTeacher:
    """A local teacher's logits on a mixed batch: ``MixTeacher(LocalTeacher(model))(batch, perm, lam) -> [B, C]``
    (fp32, no grad). Only a teacher whose model runs in this process can label new points."""

    def __init__(self, teacher):
        from .teachers.decoder import pools_last_token
        from .teachers.local import LocalTeacher

        if not isinstance(teacher, LocalTeacher):
            raise ValueError(
                f"mixup_alpha needs the teacher's forward on new mixed embeddings, which a {type(teacher).__name__} "
                "cannot run (a cache holds only the training examples' outputs): use a local teacher"
            )
        if pools_last_token(teacher.model.config):
            raise ValueError(
                "mixup_alpha: a decoder teacher pools its last non-padding token, found from input_ids, which mixed "
                "inputs_embeds do not carry: use an encoder teacher or drop mixup_alpha"
            )
        self.teacher = teacher

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor], perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        from .teachers.local import model_inputs

        t = self.teacher
        inputs = model_inputs(batch, t._accepted, t.device)
        mixed = mix_inputs(t.model.get_input_embeddings(), inputs, perm, lam)
        return t.model(**mixed, return_dict=True).logits.float()


def mixup_loss(objective, batch: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The ``mix`` term of :class:`~ad2_ds.objective.AD2Objective`: KD from the teacher's logits on the mixed batch to
    the student's. Keeps the draw in ``objective.last_mix`` (perm, lam)."""
    cfg, teacher = objective.config, objective.mix_teacher
    if teacher is None:
        raise ValueError(
            "mixup_alpha > 0 needs a teacher for the mixed points: set objective.mix_teacher = "
            "ad2_ds.mixup.MixTeacher(LocalTeacher(teacher_model))"
        )
    perm, lam = draw_mix(inputs["input_ids"].shape[0], cfg.mixup_alpha)
    objective.last_mix = (perm, lam)
    logits_t = teacher(batch, perm, lam)
    mixed = mix_inputs(objective.student.get_input_embeddings(), inputs, perm, lam)
    logits_s = objective._run(mixed, False, False).logits
    return kd_loss(logits_s, logits_t.to(logits_s.device), cfg.temperature)
