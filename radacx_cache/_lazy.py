"""A module imported on its first use, for libraries that take seconds to import (torch)."""
from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """Stands in for ``name`` until an attribute is read, then imports it and hands that over:
    ``torch = LazyModule("torch")`` at the top of a module costs nothing until ``torch.x`` runs."""

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self.__name__), attr)
