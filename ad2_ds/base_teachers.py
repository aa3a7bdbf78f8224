"""The packaged base checkpoints a default teacher is fine-tuned from, and the check that a cut student fits one.

    base_teacher(config)        # "all-MiniLM-L6-v2" without --teacher, "all-mpnet-base-v2" for that name, else None
    check_base_teacher(config)  # ConfigError when --student_layers asks for more layers than the base has

Kept apart from :mod:`ad2_ds.default_teacher` (which runs the fine-tune) so the checks made before anything loads
can use it without importing the run.
"""

import os
from typing import Optional

from .config import ConfigError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
MPNET_MODEL = "all-mpnet-base-v2"
# transformer layers of the packaged base models, so that a student asking for more fails before the fine-tune
BASE_DEPTH = {"all-MiniLM-L6-v2": 6, "all-mpnet-base-v2": 12}


def base_teacher(config) -> Optional[str]:
    """The base checkpoint the run's teacher is fine-tuned from here: all-MiniLM-L6-v2 without ``--teacher``, the
    packaged checkpoint ``--teacher`` names (all-mpnet-base-v2 or all-MiniLM-L6-v2, any spelling
    :data:`ad2_ds.data.assets.MODEL_ALIASES` accepts); None for a teacher given ready (a folder, a hub name)."""
    from .data.assets import MODEL_ALIASES

    if config.teacher is None:
        return DEFAULT_MODEL
    if os.path.isdir(os.path.expanduser(config.teacher)):  # a local folder wins over a packaged name, as resolve does
        return None
    kind = MODEL_ALIASES.get(config.teacher.strip().lower())
    return {"minilm": DEFAULT_MODEL, "mpnet": MPNET_MODEL}.get(kind)


def check_base_teacher(config) -> None:
    """A student cut from more layers than the base teacher has fails here, before the teacher is fine-tuned."""
    depth = BASE_DEPTH.get(base_teacher(config) or "")
    if config.student or depth is None:  # a given student: no layers are cut
        return
    n = int(config.student_layers.partition(":")[2])
    if n > depth:
        raise ConfigError(
            "student_layers",
            f"{config.student_layers} asks for {n} layers of {base_teacher(config)}, which has "
            f"{depth}: use at most {depth}",
        )
