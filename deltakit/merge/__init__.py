"""Naive-merge baselines (linear/BR2V, task arithmetic, TIES, DARE, Breadcrumbs, DELLA, SLERP and its variants,
Karcher, Model Stock, NearSwap, SCE, layer swap) that produce loadable MLLM checkpoints.

``merge(config, out)`` merges the text towers named by a :class:`MergeConfig` into a copy of the MLLM;
``METHODS`` is the registry (one entry per method); :mod:`deltakit.merge.methods` holds the tensor kernels.
"""

import importlib
from typing import Any

from deltakit.merge.config import METHODS, MergeConfig, MergeConfigError, ModelEntry

_RUN = ("MergeReport", "TensorAction", "merge")


def __getattr__(name: str) -> Any:
    """The names of :mod:`deltakit.merge.run`, imported (with torch) on first use so that the configs load fast."""
    if name in _RUN:
        return getattr(importlib.import_module("deltakit.merge.run"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "MergeConfig", "MergeConfigError", "ModelEntry", "MergeReport", "TensorAction", "merge"]

from deltakit._callable import make_callable  # noqa: E402

make_callable(__name__)  # deltakit.merge(config, out) is deltakit.merge.merge(config, out)
