"""Supervised fine-tuning of MLLMs with the DRIFT gradient bias: :func:`finetune` with a :class:`TrainConfig`."""

import importlib
from typing import Any

from deltakit.train.config import ConfigError, TrainConfig

_LOOP = ("TrainResult", "finetune")


def __getattr__(name: str) -> Any:
    """The names of :mod:`deltakit.train.loop`, imported (with torch) on first use so that the config loads fast."""
    if name in _LOOP:
        return getattr(importlib.import_module("deltakit.train.loop"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "TrainConfig", "TrainResult", "finetune"]
