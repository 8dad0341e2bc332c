"""``ftl distill``: a teacher model answers seed questions; every paid-for answer is kept."""

from ftl.distill.config import DistillConfig
from ftl.distill.stage import DistillResult, distill
from ftl.distill.teachers import TEACHERS, register

__all__ = ["DistillConfig", "DistillResult", "TEACHERS", "distill", "register"]
