"""Layer matching as data: which student layer imitates which teacher layer, with which loss and weight.

    specs = build_matches(cfg, n_layers_s=3, n_layers_t=6)   # [MatchSpec(layer_t=2, layer_s=1, ...), ...]

Features and losses are registries (small dicts of functions, like TextBrewer's ``presets.py``): a new one needs no
edit of the objective::

    register_loss("cosine", lambda h_s, h_t, mask: (1 - F.cosine_similarity(h_s, h_t, -1))[mask.bool()].mean())
    register_feature("mean_pool", Feature("hidden_states", select=lambda h: h.mean(1), masked=False))
    objective.use_matches([MatchSpec(6, 3, "mean_pool", "cosine", 1.0), ...])

Layers are 1-based transformer layers; hidden-state index 0 is the embedding output. Attention layer i is
``attentions[i - 1]`` in a Hugging Face output.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from .config import AD2Config, parse_layer_pairs
from .losses import LOSSES


def _same(x):
    return x


def _cls_row(h):
    return h[:, 0]  # [B, T, H] -> [B, H]: PKD compares the [CLS] state


@dataclass(frozen=True)
class Feature:
    """What a layer match compares. source: ``"hidden_states"`` (layer 0 = embeddings) or ``"attentions"`` (layers
    from 1); select: from the layer's tensor to the compared one; masked: the loss takes the attention mask as a third
    argument; adversarial: also compared on the adversarial forward (with ``adversarial_deep_kd``)."""

    source: str
    select: Callable = _same
    masked: bool = True
    adversarial: bool = True


FEATURES: Dict[str, Feature] = {
    "hidden": Feature("hidden_states"),
    "attention": Feature("attentions"),
    "cls": Feature("hidden_states", select=_cls_row, masked=False, adversarial=False),
}


def register_feature(name: str, feature: Feature) -> None:
    """Add (or replace) a feature a MatchSpec can name."""
    if feature.source not in ("hidden_states", "attentions"):
        raise ValueError(f"feature {name!r}: source must be 'hidden_states' or 'attentions', got {feature.source!r}")
    FEATURES[name] = feature


def register_loss(name: str, fn: Callable) -> None:
    """Add (or replace) a loss a MatchSpec can name: ``fn(x_s, x_t[, mask]) -> scalar tensor``."""
    LOSSES[name] = fn


@dataclass(frozen=True)
class MatchSpec:
    layer_t: int
    layer_s: int
    feature: str  # a key of FEATURES: "hidden" | "attention" | "cls" (PKD's [CLS] state) | a registered one
    loss: str  # a key of losses.LOSSES
    weight: float

    @property
    def key(self) -> str:
        return f"{self.feature}/{self.layer_s}-{self.layer_t}"


def layer_pairs(strategy: str, n_layers_s: int, n_layers_t: int) -> List[Tuple[int, int]]:
    """Student→teacher pairs of transformer layers (1-based) for a named strategy or explicit 's:t' pairs."""
    if strategy in ("uniform", "skip"):
        return [(s, round(s * n_layers_t / n_layers_s)) for s in range(1, n_layers_s + 1)]
    if strategy == "bottom":
        return [(s, s) for s in range(1, min(n_layers_s, n_layers_t) + 1)]
    if strategy == "top":
        return [(s, n_layers_t - n_layers_s + s) for s in range(1, n_layers_s + 1) if n_layers_t - n_layers_s + s >= 1]
    return parse_layer_pairs(strategy)


def build_matches(cfg: AD2Config, n_layers_s: int, n_layers_t: int) -> List[MatchSpec]:
    """The deep-KD and PKD matches a config asks for, validated against the two models' depths."""
    pairs = layer_pairs(cfg.layer_map, n_layers_s, n_layers_t)
    specs: List[MatchSpec] = []
    if cfg.w_hidden > 0:
        specs.append(MatchSpec(0, 0, "hidden", "mse", cfg.w_hidden))
        specs += [MatchSpec(t, s, "hidden", "mse", cfg.w_hidden) for s, t in pairs]
    if cfg.w_attention > 0:
        loss = "kl" if cfg.attention_loss == "kl" else "attention_mse"
        specs += [MatchSpec(t, s, "attention", loss, cfg.w_attention) for s, t in pairs if s >= 1 and t >= 1]
    if cfg.w_pkd > 0:
        # BERT-PKD: intermediate layers only; the last layer is what kd already teaches.
        specs += [MatchSpec(t, s, "cls", "pkd", cfg.w_pkd) for s, t in pairs if 1 <= s < n_layers_s]
    validate_matches(specs, LOSSES, n_layers_s, n_layers_t)
    return specs


def validate_matches(specs: Sequence[MatchSpec], losses: Dict[str, object], n_layers_s: int, n_layers_t: int) -> None:
    for spec in specs:
        if spec.feature not in FEATURES:
            raise ValueError(f"{spec}: feature must be one of {tuple(FEATURES)}")
        if spec.loss not in losses:
            raise ValueError(f"{spec}: unknown loss {spec.loss!r}; known: {', '.join(losses)}")
        low = 1 if FEATURES[spec.feature].source == "attentions" else 0
        if not (low <= spec.layer_s <= n_layers_s):
            raise ValueError(f"{spec}: student layer {spec.layer_s} outside {low}..{n_layers_s}")
        if not (low <= spec.layer_t <= n_layers_t):
            raise ValueError(f"{spec}: teacher layer {spec.layer_t} outside {low}..{n_layers_t}")
