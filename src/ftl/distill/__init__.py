"""``ftl distill``: a teacher model answers seed questions; every paid-for answer is kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftl.distill.config import DistillConfig
from ftl.lazy import lazy_exports

if TYPE_CHECKING:
    from ftl.distill.stage import DistillResult, distill
    from ftl.distill.teachers import TEACHERS, register

__all__ = ["distill", "DistillConfig", "DistillResult", "register", "TEACHERS"]
__getattr__ = lazy_exports(__name__, {
    "DistillResult": "ftl.distill.stage",
    "distill": "ftl.distill.stage",
    "TEACHERS": "ftl.distill.teachers",
    "register": "ftl.distill.teachers",
})
