"""The ``deltakit`` console command: parse flags, call the library, render the result."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from deltakit import __version__
from deltakit.cli._common import err_console
from deltakit.errors import DeltakitError

COMMANDS: dict[str, str] = {
    "diff": "How far apart two checkpoints' text towers are.",
    "merge": "Merge a text LLM into an MLLM's text tower (naive baselines).",
    "prior": "Export a DRIFT reasoning prior D = LLM - MLLM, or inspect one.",
    "finetune": "Fine-tune an MLLM; with --prior, bias it toward the LLM (DRIFT).",
    "eval": "Generate on a benchmark (MathVista, MathVerse, MATH-Vision, ...) and score it.",
    "score": "Score predictions made anywhere with a benchmark's official rules.",
    "demo": "The whole pipeline on tiny models, offline, in seconds.",
}
"""Each command (module ``deltakit.cli.<name>``) with its line in ``deltakit --help``, in pipeline order."""


class LazyGroup(click.Group):
    """The command group: lists :data:`COMMANDS` without importing them and imports only the command that runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The command names in pipeline order."""
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import ``deltakit.cli.<cmd_name>`` and return its ``command`` (None for an unknown name)."""
        if cmd_name not in COMMANDS:
            return None
        return importlib.import_module(f"deltakit.cli.{cmd_name}").command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The "Commands" section of ``deltakit --help``, from :data:`COMMANDS` alone."""
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deltakit")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
def cli(debug: bool) -> None:
    """deltakit: move reasoning from a text LLM into a multimodal LLM (diff, merge, prior, DRIFT finetune, eval)."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)])


def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear error line and exit code 1 for bad input (a traceback only with --debug).

    SIGINT (exit 130) and SIGTERM (exit 143) are raised as exceptions in the main thread, so partial outputs
    are removed on the way out; further SIGINT/SIGTERM are ignored while that cleanup runs. A signal that
    whoever started the command ignores (``nohup``, a background job) stays ignored.
    """
    import signal
    import threading

    from deltakit.errors import Terminated

    def stop(signum: int, frame: object) -> None:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()

    args = sys.argv[1:] if argv is None else argv
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not signal.SIG_IGN:
                previous[s] = signal.signal(s, stop)
    try:
        cli.main(args=args, prog_name="deltakit", standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("[red]aborted[/red]")
        sys.exit(130)
    except Terminated:
        err_console.print("[bold red]error:[/bold red] terminated (SIGTERM)", highlight=False)
        sys.exit(143)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (DeltakitError, KeyboardInterrupt) as exc:
        if "--debug" in args:
            raise
        from rich.markup import escape

        msg = str(exc) if isinstance(exc, DeltakitError) else "interrupted"
        err_console.print(f"[bold red]error:[/bold red] {escape(msg)}", highlight=False, soft_wrap=True)
        sys.exit(1 if isinstance(exc, DeltakitError) else 130)
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
