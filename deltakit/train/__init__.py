"""Supervised fine-tuning of MLLMs with the DRIFT gradient bias: :func:`finetune` with a :class:`TrainConfig`."""

from deltakit.train.config import ConfigError, TrainConfig
from deltakit.train.loop import TrainResult, finetune

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "finetune"]
