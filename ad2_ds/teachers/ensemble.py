"""Several teachers as one target: ``EnsembleTeacher(members, weights, temperature)(batch) -> TeacherOutput``.

    teacher = EnsembleTeacher([teacher_a, teacher_b], weights=(0.5, 0.5), temperature=2.0)   # any Teacher each
    out = teacher(batch)         # out.logits = t * log(weighted mean of the members' softmax(z_m / t))

Each member keeps its own placement (live, tensor-parallel or cached; built by
:func:`ad2_ds.teachers.factory.build_teacher`) and the members run one after the other on the same batch; a member
hosted on ranks of its own (a :class:`~ad2_ds.teachers.hosted.HostedTeacher`, ``--teacher_ranks 0/1``) gets its
request before the co-located members run and is waited for after them, so hosted members work side by side and the
student waits only for the slowest.

The objective takes teacher *logits* and applies ``softmax(z / t)`` (KD, the adversarial ascent and the ADA term
alike: ``losses.kd_loss``). So the ensemble hands it ``z = t * log p_mix``: ``softmax(z / t) = p_mix`` exactly (up to
rounding), and every term the objective computes uses the mixed probabilities. ``log p_mix`` is computed in log
space (``logsumexp(log w_m + log_softmax(z_m / t))``), so a probability that underflows in one member never turns
into ``-inf``. For regression (one output) the target is the weighted mean of the predictions.

Rules (``rule``):

- ``"mean"``: the weighted mean of the members' probabilities at temperature t (the usual ensemble of soft labels).
- ``"confidence"`` (ours): per example, member m's weight is proportional to ``w_m * max_c p_m(c)``, so a member
  unsure of an example counts less there. Classification only.

A member of weight 0 is not run (unless it is the source of hidden states), and when one member is left under the
``"mean"`` rule its output is handed on unchanged: weights 1/0 give exactly the single-teacher run.
"""

import time
from typing import Optional, Sequence

import torch

from .base import Teacher, TeacherOutput

RULES = ("mean", "confidence")


def normalized_weights(weights: Optional[Sequence[float]], n: int) -> tuple:
    """``weights`` (default: equal) divided by their sum; raises ValueError for a wrong count, a negative or all 0."""
    weights = tuple(float(w) for w in weights) if weights else (1.0,) * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} teacher weights for {n} teachers: give one per teacher")
    if any(w < 0 or w != w for w in weights):
        raise ValueError(f"teacher weights must be >= 0, got {list(weights)}")
    total = sum(weights)
    if total <= 0:
        raise ValueError("teacher weights are all 0: give at least one teacher a positive weight")
    return tuple(w / total for w in weights)


def mix_logits(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float = 1.0,
               rule: str = "mean") -> torch.Tensor:  # fmt: skip
    """The ensemble's target as logits. logits: per member [B, C] (C == 1: regression); weights: sum to 1.
    Classification: ``t * log p_mix`` [B, C] in fp32, so that ``softmax(. / t)`` is the mixed probabilities."""
    z = torch.stack([x.float() for x in logits])  # [M, B, C]
    w = torch.tensor(weights, dtype=torch.float32, device=z.device)
    if z.shape[-1] == 1:
        if rule != "mean":
            raise ValueError(f"teacher_rule {rule!r} is for classification; a regression ensemble uses 'mean'")
        return (w[:, None, None] * z).sum(0)
    log_p = torch.log_softmax(z / temperature, dim=-1)  # [M, B, C]
    log_w = w.log()[:, None].expand(z.shape[:2])  # [M, B]
    if rule == "confidence":
        log_w = log_w + log_p.max(dim=-1).values
        log_w = log_w - torch.logsumexp(log_w, dim=0, keepdim=True)  # per example, the weights sum to 1
    elif rule != "mean":
        raise ValueError(f"teacher_rule {rule!r}: use one of {', '.join(RULES)}")
    return temperature * torch.logsumexp(log_w[..., None] + log_p, dim=0)


class EnsembleTeacher(Teacher):
    """Members behind the one interface, combined into one target (see the module docstring).

    hidden_source: the index of the member whose hidden states (and attentions) the output carries (deep KD); None:
    logits only. names: the members' names in :attr:`seconds` order. ``seconds[m]``: time spent in member m."""

    def __init__(self, members: Sequence[Teacher], weights: Optional[Sequence[float]] = None,
                 temperature: float = 1.0, rule: str = "mean", hidden_source: Optional[int] = None,
                 names: Optional[Sequence[str]] = None):  # fmt: skip
        if not members:
            raise ValueError("an ensemble needs at least one teacher")
        if rule not in RULES:
            raise ValueError(f"teacher_rule {rule!r}: use one of {', '.join(RULES)}")
        if hidden_source is not None and not 0 <= hidden_source < len(members):
            raise ValueError(f"hidden_source {hidden_source} is not a member index (0..{len(members) - 1})")
        self.members, self.weights = list(members), normalized_weights(weights, len(members))
        self.temperature, self.rule, self.hidden_source = float(temperature), rule, hidden_source
        self.names = list(names) if names else [f"teacher{m}" for m in range(len(members))]
        self.active = [m for m, w in enumerate(self.weights) if w > 0]
        self.num_labels = getattr(self.members[self.active[0]], "num_labels", None)
        source = self.members[hidden_source] if hidden_source is not None else None
        self.output_hidden_states = bool(source is not None and source.output_hidden_states)
        self.output_attentions = bool(source is not None and source.output_attentions)
        self.seconds = [0.0] * len(members)

    def __call__(self, batch) -> TeacherOutput:
        run = sorted(set(self.active) | ({self.hidden_source} if self.hidden_source is not None else set()))
        outs = {}
        remote = [m for m in run if hasattr(self.members[m], "receive")]  # hosted: requests out first, answers last
        for m in remote:
            clock = time.perf_counter()
            self.members[m].send(batch)
            self.seconds[m] += time.perf_counter() - clock
        for m in run:
            if m not in remote:
                clock = time.perf_counter()
                outs[m] = self.members[m](batch)
                self.seconds[m] += time.perf_counter() - clock
        for m in remote:  # the student waits for the slowest hosted member only
            clock = time.perf_counter()
            outs[m] = self.members[m].receive()
            self.seconds[m] += time.perf_counter() - clock
        if len(self.active) == 1 and self.rule == "mean":
            logits = outs[self.active[0]].logits  # one member: its own logits, bit for bit
        else:
            logits = mix_logits([outs[m].logits for m in self.active], [self.weights[m] for m in self.active],
                                self.temperature, self.rule)  # fmt: skip
        source = outs.get(self.hidden_source)
        return TeacherOutput(
            logits=logits,
            hidden_states=source.hidden_states if source is not None else None,
            attentions=source.attentions if source is not None else None,
        )

    def member_seconds(self) -> dict:
        return {name: s for name, s in zip(self.names, self.seconds)}

    def close(self) -> None:
        for member in self.members:
            if hasattr(member, "close"):
                member.close()
