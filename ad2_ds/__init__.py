"""ad2-ds: task-specific knowledge distillation with adversarial data augmentation (AD2) on DeepSpeed.

from ad2_ds import RunConfig, run_distillation
results = run_distillation(RunConfig(deepspeed="ds_configs/zero2.json"))   # the whole run, as the recipe does it

from ad2_ds import AD2Config, AD2Objective
objective = AD2Objective(student, AD2Config(method="ad2"), teacher_config=teacher.config)
losses = objective(batch, teacher_output)        # {"loss", "ce", "kd", "ada", ..., "delta_norm_max"}
"""

from .config import METHODS, PRESETS, AD2Config
from .matching import Feature, MatchSpec, build_matches, layer_pairs, register_feature, register_loss
from .objective import AD2Objective
from .run import run_distillation
from .run_config import DataConfig, RunConfig
from .teachers.base import Teacher, TeacherOutput

__version__ = "0.1.0"
__all__ = [
    "AD2Config",
    "AD2Objective",
    "DataConfig",
    "Feature",
    "MatchSpec",
    "METHODS",
    "PRESETS",
    "RunConfig",
    "Teacher",
    "TeacherOutput",
    "build_matches",
    "layer_pairs",
    "register_feature",
    "register_loss",
    "run_distillation",
]
