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


threads_option = click.option("--threads", type=int, default=None,
                              help="Reader/compute threads (default: one per core; two per core for commands that write).")


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
