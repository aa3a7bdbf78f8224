"""ad2-ds: task-specific knowledge distillation with adversarial data augmentation (AD2) on DeepSpeed.

from ad2_ds import AD2Config, AD2Objective
objective = AD2Objective(student, AD2Config(method="ad2"), teacher_config=teacher.config)
losses = objective(batch, teacher_output)        # {"loss", "ce", "kd", "ada", ..., "delta_norm_max"}
"""

from .config import METHODS, PRESETS, AD2Config
from .matching import MatchSpec, build_matches, layer_pairs
from .objective import AD2Objective
from .teachers.base import Teacher, TeacherOutput

__version__ = "0.1.0"
__all__ = [
    "AD2Config",
    "AD2Objective",
    "MatchSpec",
    "METHODS",
    "PRESETS",
    "Teacher",
    "TeacherOutput",
    "build_matches",
    "layer_pairs",
]
