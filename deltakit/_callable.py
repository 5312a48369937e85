"""A module that is also its main function: ``deltakit.merge(...)`` and ``deltakit.evaluate(...)``.

The package :mod:`deltakit.merge` and the module :mod:`deltakit.evaluate` share their names with the
functions the public API exports, and importing a submodule rebinds the parent's attribute to the
module; so the module itself is made callable, and calling it calls its function of the same name.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Let module ``module_name`` (e.g. ``deltakit.merge``) be called as its function of the same last name."""
    sys.modules[module_name].__class__ = _CallableModule
