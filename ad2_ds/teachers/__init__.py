"""Teachers behind one interface: ``teacher(batch) -> TeacherOutput``."""
from .base import Teacher, TeacherOutput, teacher_inputs

__all__ = ["Teacher", "TeacherOutput", "teacher_inputs"]
