"""The miniature reproduction of the DRIFT paper, offline: a close and a far model family, the study, the demo.

Not part of the library core (nothing outside :mod:`deltakit.demo` and the ``demo`` command imports it):

- :mod:`deltakit.demo.task`: the synthetic language and the multi-step visual task, its renderer and data;
- :mod:`deltakit.demo.family`: the family builder (base LM, reasoner, close and far MLLMs) and its cache;
- :mod:`deltakit.demo.study`: one study configuration (every method on both families) and its tables and figures;
- :mod:`deltakit.demo.pipeline`: :func:`run_demo`, what ``deltakit demo`` runs;
- :mod:`deltakit.demo.settings`: the sizes and hyper-parameters (no torch);
- :mod:`deltakit.demo.samples`: a small five-task sample dataset for tests and examples (:func:`write_demo_data`).

Importing this package imports no torch; ``run_demo`` is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_demo"]


def __getattr__(name: str) -> Any:
    if name == "run_demo":
        from deltakit.demo.pipeline import run_demo

        return run_demo
    raise AttributeError(f"module 'deltakit.demo' has no attribute {name!r}")
