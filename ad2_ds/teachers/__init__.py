"""Teachers behind one interface: ``teacher(batch) -> TeacherOutput``."""

from .base import Teacher, TeacherOutput, teacher_inputs
from .cache import CachedTeacher, build_teacher_cache, fingerprint
from .ds_inference import DeepSpeedTeacher
from .ensemble import EnsembleTeacher
from .hosted import HostedTeacher, serve_teacher
from .local import LocalTeacher
from .stream import StreamingTeacher

__all__ = [
    "Teacher",
    "TeacherOutput",
    "teacher_inputs",
    "LocalTeacher",
    "DeepSpeedTeacher",
    "EnsembleTeacher",
    "CachedTeacher",
    "build_teacher_cache",
    "fingerprint",
    "StreamingTeacher",
    "HostedTeacher",
    "serve_teacher",
]
