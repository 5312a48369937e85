"""The ``deltakit`` console command: parse flags, call the library, render the result."""

from __future__ import annotations

import importlib
import logging
import sys

import click
from rich.logging import RichHandler

from deltakit import __version__
from deltakit.cli._common import err_console
from deltakit.errors import DeltakitError

COMMAND_MODULES: tuple[str, ...] = (
    "diff",
    "merge",
    "prior",
    "finetune",
    "eval",
    "demo",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deltakit")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
def cli(debug: bool) -> None:
    """deltakit: move reasoning from a text LLM into a multimodal LLM (diff, merge, prior, DRIFT finetune, eval)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)])


for _name in COMMAND_MODULES:
    cli.add_command(importlib.import_module(f"deltakit.cli.{_name}").command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear error line and exit code 1 for bad input (a traceback only with --debug)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="deltakit", standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("[red]aborted[/red]")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (DeltakitError, KeyboardInterrupt) as exc:
        if "--debug" in args:
            raise
        msg = str(exc) if isinstance(exc, DeltakitError) else "interrupted"
        err_console.print(f"[bold red]error:[/bold red] {msg}", highlight=False, soft_wrap=True)
        sys.exit(1)
