"""Pieces every CLI command shares: the console, progress bars, JSON output, common options."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from deltakit.progress import ProgressFn

console = Console()
err_console = Console(stderr=True)

json_option = click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                           help="Also write the result as JSON to this file ('-' for stdout).")
force_option = click.option("--force", is_flag=True, help="Replace the output if it already exists.")
family_option = click.option("--family", default=None, help="Override the detected model family.")
pickle_option = click.option("--allow-pickle", is_flag=True,
                             help="Allow .bin checkpoints (loaded with torch.load(weights_only=True)).")


revision_option = click.option("--revision", default=None,
                                help="Hub revision (branch, tag or commit) of a model given as org/name (or write org/name@rev).")


def benchmark_options(fn: Callable) -> Callable:
    """``--data --format --lenient --export-tsv``, shared by ``eval`` and ``score``; the format names come from the
    registry's keys (no benchmark module is imported)."""
    from deltakit.benchmarks.registry import NAMES

    for option in reversed([
        click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
                     help="The benchmark as published: parquet, JSON (+ images/), JSONL or VLMEvalKit TSV; see docs/scoring.md."),
        click.option("--format", type=click.Choice(NAMES), default=None, help="The benchmark, when its columns do not tell."),
        click.option("--lenient", is_flag=True,
                     help="Also report deltakit's lenient verdict (math-verify equivalence, boxed letters, units stripped) beside the official one."),
        click.option("--export-tsv", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Also write the predictions in VLMEvalKit's format (its TSV columns minus image, plus prediction)."),
    ]):
        fn = option(fn)
    return fn


def print_score(report: Any, title: str) -> None:
    """The per-category tables of a score report, the overall line (official, lenient beside it) and its caveats."""
    from rich.table import Table

    for key, groups in report.categories.items():
        if len(groups) < 2:
            continue
        table = Table(title=f"{title}: by {key}")
        for col in (key, "questions", "correct", "accuracy"):
            table.add_column(col, justify="left" if col == key else "right")
        for name, row in groups.items():
            table.add_row(name, str(row["examples"]), str(row["correct"]), f"{row['accuracy']:.1%}")
        console.print(table)
    line = f"[bold]{report.benchmark}: {report.correct}/{report.examples} = {report.accuracy:.1%}[/bold] (official rules)"
    if report.lenient_accuracy is not None:
        line += f"; lenient {report.lenient_correct}/{report.examples} = {report.lenient_accuracy:.1%}"
    console.print(line)
    for name, value in report.metrics.get("four_dimensional", {}).items():
        if name.startswith("score_"):
            console.print(f"We-Math {name.removeprefix('score_')} score: {value:.1%} over "
                          f"{report.metrics['four_dimensional']['problems']} multi-step problems")
    console.print(f"{report.unanswered} without a usable answer" + (f"; {report.missing} questions without a prediction"
                                                                     if report.missing else ""))
    if report.approximation:
        console.print(f"[yellow]note:[/yellow] {report.approximation}", highlight=False)
    if report.repairs:
        console.print(f"repaired data faults: {', '.join(sorted({r['id'] for r in report.repairs}))}")


threads_option = click.option("--threads", type=int, default=None,
                              help="Reader/compute threads (default: one per core).")


def selection_options(command: str) -> Callable[[Callable], Callable]:
    """The text-tower selection flags every streaming command shares (``--modules --layers --skip-first --include
    --exclude``), with ``command``'s default modules; the library parses their strings with ``Selection.parse``."""
    from deltakit.engine.selection import DEFAULT_MODULES, LAYERS_HELP, MODULES, PRIOR_MODULES

    choices = PRIOR_MODULES if command == "prior" else MODULES
    options = [
        click.option("--modules", default=",".join(DEFAULT_MODULES[command]), show_default=True,
                     help=f"Comma-separated module groups or kinds, from {', '.join(choices)}."),
        click.option("--layers", default=None, help=LAYERS_HELP),
        click.option("--skip-first", type=int, default=0, show_default=True, help="Leave the first N layers out."),
        click.option("--include", default=None, help="Comma-separated globs on canonical names a tensor must match, e.g. 'layers.*.mlp.*'."),
        click.option("--exclude", default=None, help="Comma-separated globs on canonical names to leave out, e.g. '*.bias'."),
    ]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


@contextlib.contextmanager
def progress_bar(transient: bool = True) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr, as a :class:`ProgressFn`; each new ``description`` starts a new bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err_console,
                  transient=transient, disable=not err_console.is_terminal) as bar:
        task: list[Any] = []

        def update(advance: float, total: float | None = None, description: str | None = None, info: str = "") -> None:
            if description is not None:
                task.append(bar.add_task(description, total=total, info=info))
            elif task:
                bar.update(task[-1], advance=advance, info=info) if info else bar.update(task[-1], advance=advance)

        yield update


def to_jsonable(obj: Any) -> Any:
    """Turn dataclasses, paths, tuples and non-finite floats into plain JSON values (NaN/Inf become null)."""
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path | None, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (stdout for '-', atomically to a file); do nothing for None."""
    if path is None:
        return
    text = json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        from deltakit.io.writer import write_file_atomic

        write_file_atomic(path, text.encode())
