"""The AD2 objective: ce + kd + α·ada (+ deep KD), as one module a DeepSpeed loop calls.

    objective = AD2Objective(student, AD2Config(method="ad2"), teacher_config=teacher.config)
    engine, *_ = deepspeed.initialize(model=objective, model_parameters=objective.parameters(), config=ds_json)
    losses = engine(batch, teacher(batch))     # {"loss", "ce", "kd", "ada", "hidden", ..., "delta_norm_max"}
    engine.backward(losses["loss"]); engine.step()

Wrapping the objective (not just the student) in the engine lets DeepSpeed train the deep-KD projections too. The
student may also be a DeepSpeed engine itself (``AD2Objective(engine, cfg)``); then learnable projections, needed only
when student and teacher widths differ, must be handed to that engine's optimizer by the caller
(``objective.projections.parameters()``).

Passes per step (forward units: AD2 K=1 ≈ 7 against KD's 3; the cheaper ascents 6; each variant's count) are in
docs/ARCHITECTURE.md, "Passes per step"; ``benchmarks/step_cost.py`` counts them with hooks.

The fast first step (``fast_pga``) takes the gradient from the clean forward's graph (its dropout masks: a separate
ascent forward in train mode would draw new masks of the same distribution, not the same numbers).
"""

import logging
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .ascent import cheap_delta
from .config import AD2Config
from .losses import LOSSES, hard_loss, kd_loss
from .matching import FEATURES, MatchSpec, build_matches, validate_matches
from .mixup import mixup_loss
from .modeling import (
    EmbeddingTap,
    accepted_inputs,
    find_embedding_module,
    model_inputs,
    num_layers,
    unwrap_model,
    use_predropout_attention,
)
from .patches import engine_pre_forward
from .perturb import per_example_norm, pga_perturbation, random_signs, smart_perturbation, unit_norm
from .teachers.base import TEACHER_PREFIX, TeacherOutput
from .teachers.decoder import pooled_state, pools_last_token
from .teachers.factory import TeacherNeeds

logger = logging.getLogger(__name__)
_FP16_ASCENT_SCALE = 1024.0  # keeps fp16 input gradients from underflowing; the step is normalised anyway


class AD2Objective(nn.Module):
    """Computes every AD2 loss term for one batch. ``forward(batch, teacher_output) -> dict`` of scalar tensors.

    batch: ``input_ids``, ``attention_mask``, optional ``token_type_ids``, ``labels`` ([B] long, or float for
    regression). teacher_output: a :class:`TeacherOutput` (``None`` for methods that need no teacher).
    """

    def __init__(self, student: nn.Module, config: Optional[AD2Config] = None, teacher_config=None):
        super().__init__()
        self.config = config or AD2Config()
        inner = unwrap_model(student)
        self.student = inner
        # Call the engine itself when given one (ZeRO-3 and precision handling live there); never register it.
        self.__dict__["_forward_s"] = student if student is not inner else None
        self._accepted = accepted_inputs(inner)
        self._tap = EmbeddingTap(find_embedding_module(inner), self.config.perturb_place)
        self._n_layers_s = num_layers(inner.config)
        self._hidden_s = inner.config.hidden_size
        self._n_labels_s = inner.config.num_labels
        self.last_delta: Optional[torch.Tensor] = None
        # ε and η of the current step: the config's, unless a radius schedule sets them (set_radius)
        self.epsilon, self.step_size = self.config.epsilon, self.config.step_size
        self.mix_teacher = None  # labels MixKD's mixed points (ad2_ds.mixup.MixTeacher); never a registered module
        self.delta_store = None  # ascent free: an ad2_ds.ascent.DeltaStore (run state, not a buffer)
        self._warned = False
        cfg = self.config
        pga = cfg.adversarial and cfg.perturbation == "pga"
        for eps, eta in zip(*cfg.epsilon_range):  # a schedule's two ends; η·K - ε is linear between them
            if pga and not cfg.random_start and eta * cfg.pga_steps < eps:
                logger.warning(
                    "AD2: K steps of size eta reach at most |delta| = %g < epsilon = %g; raise step_size (eta >= "
                    "epsilon / K) for the ball to matter",
                    eta * cfg.pga_steps,
                    eps,
                )
                break
        if self.config.needs_attentions:
            use_predropout_attention(inner)  # HF returns post-dropout maps: noise with no gradient in a KL

        self.matches: Optional[List[MatchSpec]] = None
        self.projections = nn.ModuleDict()
        self._hidden_t = None
        self._pool_last_t = False  # the teacher's sentence state: [CLS] (first token) or, for decoders, the last
        if teacher_config is not None:
            if teacher_config.num_labels != self._n_labels_s:
                raise ValueError(
                    f"teacher has {teacher_config.num_labels} labels but the student has {self._n_labels_s}: "
                    "they must predict the same label set"
                )
            self._hidden_t = teacher_config.hidden_size
            self._pool_last_t = pools_last_token(teacher_config)
            self._build_matches(num_layers(teacher_config))

    def set_radius(self, epsilon: float, step_size: float) -> None:
        """ε and η for the steps from now on (:class:`ad2_ds.schedule.RadiusScheduleCallback` calls it)."""
        self.epsilon, self.step_size = float(epsilon), float(step_size)

    def use_engine(self, engine) -> None:
        """From now on run the student through ``engine``, a DeepSpeed engine built around this objective's student
        after the objective (the transformers Trainer builds its engine late: :class:`ad2_ds.hf.AD2Trainer`)."""
        if unwrap_model(engine) is not self.student:
            raise ValueError("use_engine: the engine does not wrap this objective's student")
        self.__dict__["_forward_s"] = engine

    @property
    def engine(self):
        """The DeepSpeed engine the student runs through, or None."""
        return self._forward_s

    @property
    def zero3_partitioned(self) -> bool:
        """ZeRO-3 releases a module's gathered weights after the first backward through it, so the clean graph
        cannot be differentiated twice (once for δ, once for the loss); the ascent then takes the naive path."""
        return any(hasattr(p, "ds_status") for p in self.student.parameters())

    def teacher_needs(self) -> TeacherNeeds:
        """What this objective needs from a teacher: the hidden-state indices its layer map compares (None when it
        compares none) and whether it compares attention maps. :func:`ad2_ds.teachers.factory.build_teacher` takes
        it."""
        layers = sorted({m.layer_t for m in (self.matches or []) if FEATURES[m.feature].source == "hidden_states"})
        return TeacherNeeds(tuple(layers) if self.config.needs_hidden_states else None, self.config.needs_attentions)

    def close(self) -> None:
        """Remove the hook this objective put on the student's embedding layer."""
        self._tap.remove()

    def use_matches(self, specs: Sequence[MatchSpec], n_layers_t: int) -> None:
        """Compare these layer matches instead of the ones the config's weights and layer map give (they may name
        registered features and losses, :mod:`ad2_ds.matching`). Their features must be of the kinds the config asks
        the teacher for (hidden states with ``w_hidden`` or ``w_pkd`` > 0, attentions with ``w_attention`` > 0)."""
        validate_matches(specs, LOSSES, self._n_layers_s, n_layers_t)
        cfg, sources = self.config, {FEATURES[s.feature].source for s in specs}
        if ("hidden_states" in sources and not cfg.needs_hidden_states) or (
            "attentions" in sources and not cfg.needs_attentions
        ):
            raise ValueError(f"matches on {sorted(sources)} need w_hidden/w_pkd or w_attention > 0 in the config")
        self._build_matches(n_layers_t, list(specs))

    def _build_matches(self, n_layers_t: int, specs: Optional[List[MatchSpec]] = None) -> None:
        self.matches = specs if specs is not None else build_matches(self.config, self._n_layers_s, n_layers_t)
        if self._hidden_t is not None and self._hidden_t != self._hidden_s:
            for spec in self.matches:
                if FEATURES[spec.feature].source == "hidden_states" and str(spec.layer_s) not in self.projections:
                    self.projections[str(spec.layer_s)] = nn.Linear(self._hidden_s, self._hidden_t)

    def _run(self, inputs: Dict[str, torch.Tensor], hidden: bool, attentions: bool):
        kwargs = dict(inputs)
        if hidden:
            kwargs["output_hidden_states"] = True
        if attentions:
            kwargs["output_attentions"] = True
        engine = self._forward_s
        if engine is None:
            return self.student(**kwargs)
        # Through the engine's module, not engine(...): the engine hooks its outputs so that any backward through them
        # runs its backward prologue (gradient-accumulation scaling, loss-scaler and ZeRO reduction state). The
        # ascent's input-gradient pass must not trigger that; engine.backward(loss) scales the real loss itself.
        from deepspeed.runtime.torch_autocast import autocast_if_enabled  # only reached with an engine

        with autocast_if_enabled(engine):
            return self.student(**kwargs)

    def _check(self, batch: Mapping[str, torch.Tensor], t: Optional[TeacherOutput]) -> None:
        cfg = self.config
        if not cfg.needs_teacher:
            return
        if t is None:
            raise ValueError(f"method {cfg.method!r} needs teacher outputs; got teacher_output=None")
        if t.logits.shape[-1] != self._n_labels_s:
            raise ValueError(f"teacher logits have {t.logits.shape[-1]} labels but the student has {self._n_labels_s}")
        deep = cfg.deep_kd or cfg.w_pkd > 0
        if cfg.deep_kd and TEACHER_PREFIX + "input_ids" in batch:
            raise ValueError(
                "deep KD compares token positions, so teacher and student must share a tokenizer; use method 'kd', "
                "'ad2-dkd' (logits only) or 'pkd' (pooled states through a learned projection) with different "
                "tokenizers"
            )
        if cfg.needs_hidden_states and t.hidden_states is None:
            raise ValueError("deep KD asked but the teacher gave no hidden states: build it with output_hidden_states")
        if cfg.needs_attentions and t.attentions is None:
            raise ValueError("attention KD asked but the teacher gave no attentions: build it with output_attentions")
        if self.matches is None:
            if deep:
                self._build_matches(len(t.hidden_states) - 1 if t.hidden_states is not None else len(t.attentions))
            else:
                self.matches = []

    def _adversarial_loss(self, logits_s, t: Optional[TeacherOutput], labels) -> torch.Tensor:
        if self.config.adversarial_target == "labels":
            return hard_loss(logits_s, labels)
        return kd_loss(logits_s, t.logits, self.config.temperature)

    def _deep_terms(self, out_s, t: TeacherOutput, mask, adversarial: bool, mask_t=None) -> Dict[str, torch.Tensor]:
        """Unweighted deep-KD terms keyed by MatchSpec.key (``hidden/3-6``), prefixed ``ada_`` when adversarial.
        Each match's feature (:data:`ad2_ds.matching.FEATURES`) says what is compared, its loss (``LOSSES``) how.
        PKD's pooled terms ("cls") compare the student's [CLS] state with the state the teacher's classifier pools
        (its [CLS], or a decoder's last real token under ``mask_t``), so they work across tokenizers too; the other
        token-by-token features need aligned tokens."""
        terms = {}
        for spec in self.matches:
            feature = FEATURES[spec.feature]
            if adversarial and not feature.adversarial:
                continue
            if feature.source == "attentions":
                x_s, x_t = out_s.attentions[spec.layer_s - 1], _layer(t.attentions, spec.layer_t - 1, "attentions")
                x_s, x_t = self._match_heads(x_s, x_t)
            else:
                x_s, x_t = out_s.hidden_states[spec.layer_s], _layer(t.hidden_states, spec.layer_t, "hidden_states")
                x_s = self._project(spec.layer_s, x_s, x_t)
                if x_s.shape[1] != x_t.shape[1] and spec.feature != "cls":
                    raise ValueError(
                        f"student sequence length {x_s.shape[1]} differs from the teacher's {x_t.shape[1]}: "
                        "deep KD needs aligned tokens"
                    )
            if spec.feature == "cls":  # the teacher's pooled token: [CLS], or a decoder's last real token
                x_s, x_t = feature.select(x_s), pooled_state(x_t, mask_t, self._pool_last_t).to(x_s.device)
            else:
                x_s, x_t = feature.select(x_s), feature.select(x_t).to(x_s.device)
            fn = LOSSES[spec.loss]
            terms[("ada_" if adversarial else "") + spec.key] = fn(x_s, x_t, mask) if feature.masked else fn(x_s, x_t)
        return terms

    def _project(self, layer_s: int, h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
        if h_s.shape[-1] == h_t.shape[-1]:
            return h_s
        key = str(layer_s)
        if key not in self.projections:
            raise ValueError(
                f"student width {h_s.shape[-1]} differs from the teacher's {h_t.shape[-1]}: pass "
                "teacher_config=teacher.config to AD2Objective so it can build learnable projections"
            )
        proj = self.projections[key]
        return proj(h_s.to(proj.weight.dtype))

    def _match_heads(self, a_s: torch.Tensor, a_t: torch.Tensor):
        if a_s.shape[1] == a_t.shape[1]:
            return a_s, a_t
        if self.config.head_mismatch == "error":
            raise ValueError(
                f"student has {a_s.shape[1]} attention heads, teacher {a_t.shape[1]}: set head_mismatch='mean' to "
                "compare head-averaged maps"
            )
        return a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)

    def forward(self, batch: Mapping[str, torch.Tensor], teacher_output: Optional[TeacherOutput] = None):
        cfg, t = self.config, teacher_output
        self._check(batch, t)
        if self._forward_s is not None:
            engine_pre_forward(self._forward_s)
        inputs = model_inputs(batch, self._accepted)
        mask, labels = batch["attention_mask"], batch["labels"]
        need_h, need_a = cfg.needs_hidden_states, cfg.needs_attentions
        fast = (
            cfg.adversarial
            and cfg.fast_pga
            and cfg.perturbation == "pga"
            and not cfg.random_start
            and not cfg.zero_delta
            and not self.zero3_partitioned
            and cfg.ascent == "kl"
        )

        self._tap.capture = fast or (cfg.adversarial and cfg.ascent == "clean_grad")
        try:
            out_s = self._run(inputs, need_h, need_a)
        finally:
            self._tap.capture = False
        emb, self._tap.captured = self._tap.captured, None

        losses: Dict[str, torch.Tensor] = {}
        total = out_s.logits.new_zeros((), dtype=torch.float32)
        if cfg.w_ce > 0:
            losses["ce"] = hard_loss(out_s.logits, labels)
            total = total + cfg.w_ce * losses["ce"]
        if cfg.w_kd > 0:
            losses["kd"] = kd_loss(out_s.logits, t.logits, cfg.temperature)
            total = total + cfg.w_kd * losses["kd"]
        if self.matches:
            mask_t = batch.get(TEACHER_PREFIX + "attention_mask", mask)
            total = total + self._add_deep(losses, self._deep_terms(out_s, t, mask, False, mask_t), 1.0)

        if cfg.adversarial and cfg.ascent != "kl":  # 6 units: no input-only backward (ad2_ds.ascent)
            delta, total = cheap_delta(self, batch, inputs, emb, total, mask)
        elif cfg.adversarial:
            delta = self.perturbation(
                batch, t, inputs=inputs, clean_logits=out_s.logits, clean_emb=emb, clean_ref=self._tap.reference
            )
        if cfg.adversarial:
            deep_adv = bool(self.matches) and cfg.adversarial_deep_kd and (cfg.w_hidden > 0 or need_a)
            self._tap.delta, self._tap.measure = delta, True
            try:
                out_adv = self._run(inputs, deep_adv and cfg.w_hidden > 0, deep_adv and need_a)
            finally:
                self._tap.delta, self._tap.measure = None, False
            losses["ada"] = self._adversarial_loss(out_adv.logits, t, labels)
            total = total + cfg.alpha * losses["ada"]
            if deep_adv:
                total = total + self._add_deep(losses, self._deep_terms(out_adv, t, mask, True), cfg.alpha)
            losses.update(self._delta_stats(delta, mask))
            self._warn_if_vanished(losses["delta_applied"], out_adv.logits.dtype)
        if cfg.mixup:  # after the ascent: the mixed forward overwrites the tap's clean reference
            losses["mix"] = mixup_loss(self, batch, inputs)
            total = total + cfg.mixup_weight * losses["mix"]

        out = {k: v.detach() for k, v in losses.items()}
        out["loss"] = total
        return out

    def _delta_stats(self, delta: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """delta_norm_max: largest per-example L2 norm; delta_relative: mean over tokens of ‖δ_t‖₂ / ‖e_t‖₂ (e: the
        clean tensor at δ's place); delta_applied: share of δ's norm that survived rounding into the embedding dtype
        (not clamped: > 1 means rounding added to it; ~0 means the adversarial sample is the clean one, e.g. ε=1e-5 in
        bf16, and ε should grow); delta_cosine: cosine between the δ asked for and the δ applied."""
        with torch.no_grad():
            norms = per_example_norm(delta)
            tokens = mask.to(torch.bool)
            ratio = delta.norm(dim=-1) / self._tap.reference.float().norm(dim=-1).clamp_min(1e-30)
            return {
                "delta_norm_max": norms.max(),
                "delta_relative": ratio[tokens].mean(),
                "delta_applied": self._tap.applied.sum() / norms.sum().clamp_min(1e-30),
                "delta_cosine": self._tap.applied_cosine,
            }

    def _warn_if_vanished(self, applied: torch.Tensor, dtype) -> None:
        if self._warned or self.config.zero_delta or self.epsilon == 0 or not bool(self.last_delta.any()):
            return
        ratio = float(applied)
        if ratio < 0.5:
            self._warned = True
            logger.warning(
                "AD2: only %.0f%% of the perturbation (epsilon=%g, %s) survives being added to the %s embeddings; "
                "the adversarial sample is nearly the clean one. Raise --epsilon and --step_size together (e.g. both "
                ">= 1e-2 in bf16/fp16), use --perturb_size relative, or train in fp32.",
                100 * ratio,
                self.epsilon,
                self.config.perturbation,
                dtype,
            )

    def _add_deep(self, losses, terms: Dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Store per-layer terms and their weighted sums per feature (``hidden``, ``ada_attention``, ``pkd``, ...)."""
        weights = {spec.key: spec.weight for spec in self.matches}
        total = 0.0
        for key, value in terms.items():
            losses[key] = value
            feature = key.split("/")[0]
            group = {"cls": "pkd", "ada_cls": "ada_pkd"}.get(feature, feature)
            weighted = weights[key.removeprefix("ada_")] * value
            losses[group] = losses.get(group, 0.0) + weighted.detach()
            total = total + scale * weighted
        return total

    def perturbation(
        self,
        batch: Mapping[str, torch.Tensor],
        teacher_output: Optional[TeacherOutput],
        inputs: Optional[Dict[str, torch.Tensor]] = None,
        clean_logits: Optional[torch.Tensor] = None,
        clean_emb: Optional[torch.Tensor] = None,
        clean_ref: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """δ for this batch ([B, T, H_emb], fp32, detached) at the configured place: K steps of projected gradient
        ascent (``pga``) or SMART's renormalised ascent (``smart``); zeros for the ε = 0 control; then random signs
        for the ``random_direction`` control.

        With ``clean_logits`` and the tensor ``clean_emb`` at δ's place of a retained clean forward, the first pga
        gradient comes from that graph (input grads only, no extra forward; exact for that forward's dropout sample).
        Without them (naive path), or after the first step, each step runs the student forward on the perturbed input.
        A relative radius (``perturb_size="relative"``) is measured on ``clean_ref``, the clean tensor at δ's place
        (the tap's ``reference`` after the clean forward); without it a no-grad clean forward is run here.
        """
        cfg = self.config
        inputs = inputs if inputs is not None else model_inputs(batch, self._accepted)
        mask, labels = batch["attention_mask"], batch["labels"]
        scale = 1.0

        def loss_fn(delta):
            self._tap.delta = delta
            try:
                return self._adversarial_loss(self._run(inputs, False, False).logits, teacher_output, labels)
            finally:
                self._tap.delta = None

        init_grad, shape = None, None
        if clean_emb is not None and clean_logits is not None:
            scale = _FP16_ASCENT_SCALE if clean_emb.dtype == torch.float16 else 1.0
            loss0 = self._adversarial_loss(clean_logits, teacher_output, labels) * scale
            (init_grad,) = torch.autograd.grad(loss0, clean_emb, retain_graph=True)
            shape = clean_emb.shape
        else:
            shape = self._embedding_shape(inputs)
        if cfg.zero_delta:
            delta = torch.zeros(shape, dtype=torch.float32, device=mask.device)
        elif cfg.perturbation == "smart":
            # mt-dnn differentiates a KL summed over the batch: its η·∇ meets the noise at that scale
            delta = smart_perturbation(
                loss_fn, shape, mask, cfg.noise_var, self.step_size, cfg.pga_steps, cfg.perturb_norm,
                loss_scale=float(shape[0]),
            )  # fmt: skip
        else:
            delta = pga_perturbation(
                loss_fn,
                shape,
                mask,
                self.epsilon,
                self.step_size,
                cfg.pga_steps,
                init_grad=init_grad,
                random_init=cfg.random_start,
                loss_scale=scale,
                norm=cfg.perturb_norm,
                scale=self._relative_scale(inputs, mask, clean_ref) if cfg.perturb_size == "relative" else None,
            )
        if cfg.random_direction:
            delta = random_signs(delta)
        self.last_delta = delta
        return delta

    def _relative_scale(self, inputs, mask, clean_ref: Optional[torch.Tensor]) -> torch.Tensor:
        """The clean tensor's norm at δ's place over non-padding positions, per token ([B, T, 1]) or per example
        ([B, 1, 1])."""
        if clean_ref is None:
            with torch.no_grad():
                self._run(inputs, False, False)
            clean_ref = self._tap.reference
        return unit_norm(clean_ref.float() * mask.to(torch.float32).unsqueeze(-1), self.config.perturb_norm)

    def _embedding_shape(self, inputs) -> torch.Size:
        # ELECTRA-style models embed at embedding_size and project afterwards; δ lives at the embedding output.
        cfg = self.student.config
        dim = getattr(cfg, "embedding_size", None) or cfg.hidden_size
        return torch.Size((*inputs["input_ids"].shape, dim))


def _layer(seq, index: int, what: str) -> torch.Tensor:
    value = seq[index] if seq is not None and index < len(seq) else None
    if value is None:
        raise ValueError(f"the teacher output has no {what}[{index}], which the layer map needs")
    return value
