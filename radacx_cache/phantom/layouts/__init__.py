"""The phantom's file and table layouts, one module per archive (docs/archives.md): ``base`` (MIMIC-CXR-JPG,
and what the open archives share), ``nih``, ``chexpert``, ``vindr``, ``padchest``.

Every module of this folder is imported here and every ``Layout`` subclass it defines is collected in
``LAYOUTS`` by its ``name`` (one per archive of ``sources.ARCHIVES``; tests/test_archives.py checks
that), so a new archive's layout is a new module, found rather than listed.
"""
import importlib
import pkgutil

from .base import CHEXMASK_SUBDIR, Layout

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def _layouts(cls=Layout) -> list:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _layouts(child))]


LAYOUTS = {cls.name: cls() for cls in _layouts() if not cls.__name__.startswith("_")}

__all__ = ["CHEXMASK_SUBDIR", "LAYOUTS", "Layout"]
