"""Naive-merge baselines (linear/BR2V, task arithmetic, TIES, DARE, layer swap) that produce loadable MLLM checkpoints.

``merge(config, out)`` merges the text towers named by a :class:`MergeConfig` into a copy of the MLLM;
:mod:`deltakit.merge.methods` holds the pure tensor formulas.
"""

from deltakit.merge.config import METHODS, MergeConfig, MergeConfigError, ModelEntry
from deltakit.merge.run import MergeReport, TensorAction, merge

__all__ = ["METHODS", "MergeConfig", "MergeConfigError", "ModelEntry", "MergeReport", "TensorAction", "merge"]
