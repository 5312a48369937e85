"""``deltakit demo``: the miniature family (built or reused), then the study's smallest configuration into OUT.

:func:`run_demo` gets the family from the cache (:func:`deltakit.demo.family.ensure_family`, built on first
use), then runs :func:`deltakit.demo.study.run_config` with one seed: for both the close and the far MLLM,
``diff`` against the reasoner, every merge, the three priors, SFT and DRIFT per rule and per prior, and
``eval`` plus held-out CoT loss of every model. Everything lands in one folder that appears only when
complete (layout in ``docs/demo.md``): data, priors, models, reports, ``study.json``, the figures and
``demo.json`` (the summary the CLI prints).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from deltakit.demo.family import ensure_family
from deltakit.demo.settings import DemoSettings
from deltakit.demo.study import (
    aggregate,
    markdown_table,
    plot_accuracy,
    plot_pairs,
    run_config,
)
from deltakit.io.writer import atomic_output_dir, check_output_free
from deltakit.progress import ProgressFn, no_progress


@dataclass
class DemoReport:
    """What :func:`run_demo` did and found (``demo.json``; paths relative to ``out``)."""

    out: str
    family: str
    family_built: bool
    family_seconds: float
    settings: dict[str, Any]
    table: dict[str, Any]
    pairs: dict[str, Any]
    verdicts: dict[str, Any]
    artifacts: dict[str, str]
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_demo(out: str | os.PathLike, settings: DemoSettings = DemoSettings(), force: bool = False,
             progress: ProgressFn = no_progress, cache: str | os.PathLike | None = None,
             log: Any = lambda line: None) -> DemoReport:
    """Run the demo into ``out`` (see the module docstring); ``cache`` overrides the family cache folder."""
    settings = settings.validated()
    out = check_output_free(out, force)
    started, cpu = time.perf_counter(), time.process_time()
    family, built = ensure_family(settings.recipe, cache=cache, progress=progress)
    family_seconds = time.perf_counter() - started
    with atomic_output_dir(out, force) as root:
        config = run_config(family, settings.study, settings.seed, root, progress=progress, log=log)
        agg = aggregate([config])
        plot_pairs(agg, root / "figures" / "pairs.png")
        plot_accuracy(agg, root / "figures" / "accuracy.png")
        (root / "table.md").write_text(markdown_table(agg))
        artifacts = {"family": str(family.root), "data": "data", "priors": "priors", "models": "models", "reports": "reports",
                     "study": "study.json", "table": "table.md", "pairs_figure": "figures/pairs.png",
                     "accuracy_figure": "figures/accuracy.png"}
        report = DemoReport(str(out), str(family.root), built, round(family_seconds, 1), asdict(settings), agg["table"],
                            agg["pairs"], agg["verdicts"], artifacts, round(time.perf_counter() - started, 1),
                            round(time.process_time() - cpu, 1),
                            {"family": round(family_seconds, 1), "study": config["seconds"]})
        (root / "demo.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return report
