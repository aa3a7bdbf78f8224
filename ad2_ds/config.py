"""What to optimise: ``AD2Config(method="ad2", alpha=1.0, ...)``, a frozen, validated dataclass.

    cfg = AD2Config(method="kd", temperature=2.0)         # a preset
    cfg = AD2Config(method="ad2", w_attention=0.0)        # a preset, overridden term by term

Presets (every term weight left as ``None`` takes the preset's value):

| method     | ce | kd | ada (α) | deep KD (hidden, attention) | pkd | teacher |
|------------|----|----|---------|------------------------------|-----|---------|
| finetune   | 1  | 0  | 0       | 0                            | 0   | no      |
| kd         | 1  | 1  | 0       | 0                            | 0   | yes     |
| pkd        | 1  | 1  | 0       | 0                            | 100 | yes     |
| ad2        | 1  | 1  | 1       | 1, 1 (clean and adversarial) | 0   | yes     |
| ad2-dkd    | 1  | 1  | 1       | 0                            | 0   | yes     |
| ad2-kd     | 1  | 0  | 1       | 0                            | 0   | no: δ maximises CE on labels |
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

PRESETS = {
    "finetune": dict(
        w_ce=1.0, w_kd=0.0, alpha=0.0, w_hidden=0.0, w_attention=0.0, w_pkd=0.0, adversarial_target="teacher"
    ),
    "kd": dict(w_ce=1.0, w_kd=1.0, alpha=0.0, w_hidden=0.0, w_attention=0.0, w_pkd=0.0, adversarial_target="teacher"),
    "pkd": dict(
        w_ce=1.0, w_kd=1.0, alpha=0.0, w_hidden=0.0, w_attention=0.0, w_pkd=100.0, adversarial_target="teacher"
    ),
    "ad2": dict(w_ce=1.0, w_kd=1.0, alpha=1.0, w_hidden=1.0, w_attention=1.0, w_pkd=0.0, adversarial_target="teacher"),
    "ad2-dkd": dict(
        w_ce=1.0, w_kd=1.0, alpha=1.0, w_hidden=0.0, w_attention=0.0, w_pkd=0.0, adversarial_target="teacher"
    ),
    "ad2-kd": dict(
        w_ce=1.0, w_kd=0.0, alpha=1.0, w_hidden=0.0, w_attention=0.0, w_pkd=0.0, adversarial_target="labels"
    ),
}
METHODS = tuple(PRESETS)
LAYER_MAPS = ("uniform", "skip", "bottom", "top")
ATTENTION_LOSSES = ("kl", "mse")
HEAD_MISMATCH = ("mean", "error")


@dataclass(frozen=True)
class AD2Config:
    """The AD2 objective's settings. Paper defaults: α=1, t=1, ε=1e-5, η=1e-3, K=1.

    alpha: weight of the adversarial KD loss ``ada`` (also scales the adversarial deep-KD terms).
    temperature: softmax temperature t of ``kd`` and ``ada`` (losses carry the t² factor).
    epsilon: radius of the per-example L2 ball of δ; step_size: η of the normalised ascent; pga_steps: K.
    random_start: start the ascent at a random point of the ball (costs one extra forward/backward).
    fast_pga: reuse the clean forward's graph for the first ascent gradient (exact; saves one forward).
    adversarial_target: "teacher" (δ maximises KL to the teacher's soft labels) or "labels" (ad2-kd: CE on labels).
    layer_map: "uniform"/"skip", "bottom", "top", or explicit pairs "s:t,s:t" (student layer : teacher layer, 1-based
        transformer layers; the embedding output 0:0 is matched for hidden states in every map).
    attention_loss: "kl" or "mse"; head_mismatch: "mean" (compare head-averaged maps) or "error".
    adversarial_deep_kd: also apply the deep-KD terms to the adversarial forward (paper's DKD on both inputs).
    """

    method: str = "ad2"
    alpha: Optional[float] = None
    temperature: float = 1.0
    epsilon: float = 1e-5
    step_size: float = 1e-3
    pga_steps: int = 1
    random_start: bool = False
    fast_pga: bool = True
    w_ce: Optional[float] = None
    w_kd: Optional[float] = None
    w_hidden: Optional[float] = None
    w_attention: Optional[float] = None
    w_pkd: Optional[float] = None
    adversarial_target: Optional[str] = None
    adversarial_deep_kd: bool = True
    layer_map: str = "uniform"
    attention_loss: str = "kl"
    head_mismatch: str = "mean"

    def __post_init__(self):
        if self.method not in PRESETS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        for key, value in PRESETS[self.method].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        checks = [
            (self.epsilon >= 0, f"epsilon must be >= 0, got {self.epsilon}"),
            (self.step_size > 0, f"step_size must be > 0, got {self.step_size}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (
                isinstance(self.pga_steps, int) and self.pga_steps >= 1,
                f"pga_steps must be an int >= 1, got {self.pga_steps}",
            ),
            (
                self.adversarial_target in ("teacher", "labels"),
                f"adversarial_target must be 'teacher' or 'labels', got {self.adversarial_target!r}",
            ),
            (
                self.attention_loss in ATTENTION_LOSSES,
                f"attention_loss must be one of {ATTENTION_LOSSES}, got {self.attention_loss!r}",
            ),
            (
                self.head_mismatch in HEAD_MISMATCH,
                f"head_mismatch must be one of {HEAD_MISMATCH}, got {self.head_mismatch!r}",
            ),
        ]
        for name in ("alpha", "w_ce", "w_kd", "w_hidden", "w_attention", "w_pkd"):
            value = getattr(self, name)
            checks.append((value >= 0, f"{name} must be >= 0, got {value}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.layer_map not in LAYER_MAPS:
            parse_layer_pairs(self.layer_map)  # raises on a malformed explicit map
        if self.total_weight() == 0:
            raise ValueError("every loss weight is 0: nothing to optimise")

    def total_weight(self) -> float:
        return self.w_ce + self.w_kd + self.alpha + self.w_hidden + self.w_attention + self.w_pkd

    @property
    def adversarial(self) -> bool:
        return self.alpha > 0

    @property
    def deep_kd(self) -> bool:
        return self.w_hidden > 0 or self.w_attention > 0

    @property
    def needs_teacher(self) -> bool:
        adv_teacher = self.adversarial and self.adversarial_target == "teacher"
        return self.w_kd > 0 or self.deep_kd or self.w_pkd > 0 or adv_teacher

    @property
    def needs_hidden_states(self) -> bool:
        return self.w_hidden > 0 or self.w_pkd > 0

    @property
    def needs_attentions(self) -> bool:
        return self.w_attention > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_layer_pairs(spec: str):
    """'1:2,2:4,3:6' -> [(1, 2), (2, 4), (3, 6)] (student layer, teacher layer)."""
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in spec.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise ValueError(
            f"layer_map {spec!r} is not one of {LAYER_MAPS} nor explicit pairs like '1:2,2:4,3:6' (student:teacher)"
        )
    return pairs
