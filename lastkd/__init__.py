"""lastkd: distil a frozen VideoMAE V2 teacher into the LAST v2 skeleton student.

Importing ``lastkd`` stays cheap (no torch): it only arranges for the teacher models to be
registered with timm, so ``timm.create_model("videomae_v2_vit_b")`` works after ``import lastkd``
whichever of the two was imported first. The registration itself (``lastkd.models.videomae``)
imports torch, so it happens only when timm is in use.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

_TIMM = "timm"
_TEACHER_MODELS = "lastkd.models.videomae"


def _register_with_timm() -> None:
    __import__(_TEACHER_MODELS)


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``timm`` is imported, runs its real loader, then registers."""

    def find_spec(
        self, fullname: str, path: object, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TIMM:
            return None
        sys.meta_path.remove(self)  # once; and so the lookup below finds timm's real spec
        spec = None
        for finder in sys.meta_path:  # the finders that would have found timm without us
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        real_exec = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            real_exec(module)
            _register_with_timm()

        loader.exec_module = exec_then_register  # this spec's loader only
        return spec


if _TIMM in sys.modules:
    _register_with_timm()
else:
    sys.meta_path.insert(0, _RegisterAfterTimm())
