"""Benchmarks as published, each with its official scoring rules (see ``docs/scoring.md``).

A benchmark is one module here with one :class:`~deltakit.benchmarks.core.Benchmark` subclass (its reader,
prompt and official scorer), registered by one line in :data:`~deltakit.benchmarks.registry.BENCHMARKS`.
The machinery (:func:`load`, :func:`score`, :class:`ScoreReport` ...) lives in :mod:`deltakit.benchmarks.core`
and is imported on first use, so the registry's names cost nothing to list.
"""

from __future__ import annotations

from typing import Any

from deltakit.benchmarks.registry import BENCHMARKS, NAMES

__all__ = ["BENCHMARKS", "NAMES", "Benchmark", "Item", "ScoreReport", "Scored", "detect", "get", "load", "render_prompt",
           "report", "score", "score_one"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from deltakit.benchmarks import core

        return getattr(core, name)
    raise AttributeError(f"module 'deltakit.benchmarks' has no attribute {name!r}")
