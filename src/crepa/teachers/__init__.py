"""Frozen image encoders that give CREPA its targets, and the one function that turns a clip into them.

Any callable following :class:`Teacher` works; :func:`load_teacher` loads DINOv2 (transformers or
timm), CLIP and SigLIP vision towers. :func:`clip_teacher_grid` maps a clip's pixel frames to
teacher features per latent frame on the student's token grid.
"""

from crepa.teachers.loader import TeacherKind, detect_teacher_kind, load_teacher
from crepa.teachers.protocol import Teacher
from crepa.teachers.size import teacher_input_size
from crepa.teachers.targets import clip_teacher_grid
from crepa.teachers.timm_dinov2 import TimmTeacher, load_timm_teacher
from crepa.teachers.transformers_vit import TOWER_KINDS, TransformersTeacher, load_transformers_teacher
from crepa.teachers.vit import IMAGENET_MEAN, IMAGENET_STD, ViTTeacher

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TOWER_KINDS",
    "Teacher",
    "TeacherKind",
    "TimmTeacher",
    "TransformersTeacher",
    "ViTTeacher",
    "clip_teacher_grid",
    "detect_teacher_kind",
    "load_teacher",
    "load_timm_teacher",
    "load_transformers_teacher",
    "teacher_input_size",
]
