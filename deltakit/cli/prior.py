"""``deltakit prior``: export a DRIFT reasoning prior (``prior --mllm A --llm B OUT``) or ``prior inspect`` one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from deltakit.cli._common import console, force_option, json_option, progress_bar, selection_options, threads_option, write_json

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}


class _ExportOrInspect(click.Group):
    """``prior inspect ...`` runs the subcommand; anything else (``prior --mllm ...``) is ``prior export``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["export", *args]
        return super().parse_args(ctx, args)


@click.group("prior", cls=_ExportOrInspect, no_args_is_help=True)
def command() -> None:
    """Export a DRIFT reasoning prior D = theta_LLM - theta_MLLM, or inspect one.

    \b
    deltakit prior --mllm A --llm B OUT.safetensors [options]   (same as `prior export`)
    deltakit prior inspect PRIOR.safetensors
    """


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _worst(entries: dict[str, dict[str, Any]]) -> str:
    name = min(entries, key=lambda n: entries[n]["cosine"])
    return f"{name}: cosine {entries[name]['cosine']:.6f}"


def _module_table(title: str, modules: dict[str, dict[str, Any]], compressed: bool) -> Table:
    table = Table(title=title)
    for col in ("module", "tensors", "params", "|D|", "|W_MLLM|", "|D|/|W|", "MB") + (("cosine",) if compressed else ()):
        table.add_column(col, justify="left" if col == "module" else "right")
    for kind, m in modules.items():
        row = [kind, str(m["tensors"]), f"{m['params']:,}", _fmt(m["d_norm"]), _fmt(m["w_norm"]), _fmt(m["ratio"]),
               f"{m['bytes'] / 1e6:.2f}"]
        table.add_row(*row, *((_fmt(m["cosine"], ".6f"),) if compressed else ()))
    return table


@command.command("export")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mllm", required=True, help="The multimodal model the prior is for (names and shapes follow it).")
@click.option("--llm", help="The reasoning LLM: D = LLM - MLLM.")
@click.option("--from", "from_llm", help="Two-model mode: D = TO - FROM (two LLMs of one family), named for --mllm.")
@click.option("--to", "to_llm", help="Two-model mode: the LLM D points to.")
@selection_options("prior")
@click.option("--dtype", type=click.Choice(list(_DTYPES)), default="bfloat16", show_default=True, help="Stored dtype of D.")
@click.option("--normalize", is_flag=True, help="Rescale each tensor so that |D| = |W_MLLM|.")
@click.option("--compress", help="lowrank:R (truncated SVD per matrix), topk:F (keep fraction F by magnitude) or int8 (per-row scale).")
@click.option("--alpha", help="Per-module DRIFT alpha stored in the prior, e.g. attn=0.5,mlp=1 (default 1).")
@threads_option
@force_option
@json_option
def export(out: Path, mllm: str, llm: str | None, from_llm: str | None, to_llm: str | None, modules: str,
           layers: str | None, skip_first: int, include: str | None, exclude: str | None, dtype: str, normalize: bool,
           compress: str | None, alpha: str | None, threads: int | None, force: bool, json_path: Path | None) -> None:
    """Write the prior D for --mllm to OUT.safetensors (D = LLM - MLLM, or TO - FROM)."""
    from deltakit.prior import export_prior, per_module

    with progress_bar() as progress:
        report = export_prior(mllm, llm, out, from_llm=from_llm, to_llm=to_llm,
                              modules=modules, layers=layers, skip_first=skip_first, include=include, exclude=exclude,
                              dtype=_DTYPES[dtype], normalize=normalize, compress=compress, alpha=alpha, force=force,
                              progress=progress, threads=threads)
    write_json(json_path, report)
    if json_path is not None and str(json_path) == "-":
        return
    t = report.totals
    table = Table(title="deltakit prior", show_header=False)
    table.add_row("output", str(report.out))
    table.add_row("for", f"{report.sources['mllm']['path']} ({report.family})")
    for role in ("llm", "from", "to"):
        if role in report.sources:
            table.add_row(role, f"{report.sources[role]['path']} ({report.sources[role]['family']})")
    table.add_row("tensors", f"{t['tensors']} ({t['params']:,} parameters), modules {','.join(report.modules)}")
    table.add_row("dtype", report.dtype + (", normalized to |W_MLLM|" if report.normalize else ""))
    table.add_row("|D| / |W_MLLM|", f"{t['d_norm']:.4g} / {t['w_norm']:.4g}")
    table.add_row("size", f"{report.bytes_on_disk / 1e6:.2f} MB on disk (uncompressed {t['full_bytes'] / 1e6:.2f} MB)")
    if report.compression:
        table.add_row("fidelity", f"cosine {t['cosine']:.6f}, relative error {t['rel_error']:.4g} vs the float32 D")
        table.add_row("worst tensor", _worst(report.tensors))
    table.add_row("time", f"{report.seconds:.1f} s")
    console.print(table)
    console.print(_module_table("per module", per_module(report.tensors), bool(report.compression)))
    for line in report.notes:
        console.print(f"[yellow]note:[/yellow] {line}", highlight=False)


@command.command("inspect")
@click.argument("prior", type=click.Path(path_type=Path))
@json_option
def inspect(prior: Path, json_path: Path | None) -> None:
    """Print a prior's metadata and per-module statistics."""
    from deltakit.prior import Prior

    p = Prior.open(prior)
    summary = p.summary()
    write_json(json_path, summary)
    if json_path is not None and str(json_path) == "-":
        return
    table = Table(title=f"prior {summary['path']}", show_header=False)
    table.add_row("family", summary["family"])
    table.add_row("mode", summary["mode"])
    for role, src in summary["sources"].items():
        table.add_row(role, f"{src['path']} ({src['family']}, config sha256 {(src['config_sha256'] or '-')[:12]})")
    table.add_row("modules", ",".join(summary["modules"]))
    table.add_row("layers", "all" if summary["layers"] is None else ",".join(f"{a}:{'' if b is None else b}" for a, b in summary["layers"]))
    table.add_row("skip first", str(summary["skip_first"]))
    table.add_row("dtype", summary["dtype"] + (", normalized" if summary["normalize"] else ""))
    comp = summary["compression"]
    table.add_row("compression", "none" if comp is None else ", ".join(f"{k} {v}" for k, v in comp.items()))
    if summary["alpha"]:
        table.add_row("alpha", ", ".join(f"{k}={v:g}" for k, v in summary["alpha"].items()))
    t = summary["totals"]
    table.add_row("tensors", f"{t['tensors']} ({t['params']:,} parameters)")
    table.add_row("|D| / |W_MLLM|", f"{t['d_norm']:.6g} / {t['w_norm']:.6g}")
    table.add_row("size", f"{summary['bytes_on_disk']:,} bytes (uncompressed {t['full_bytes']:,})")
    if comp is not None:
        table.add_row("fidelity", f"cosine {t['cosine']:.6f}, relative error {t['rel_error']:.4g}")
        table.add_row("worst tensor", _worst(p.entries))
    table.add_row("written by", f"deltakit {summary['deltakit_version']}, format {summary['format_version']}")
    console.print(table)
    console.print(_module_table("per module", summary["per_module"], comp is not None))
    for line in summary["notes"]:
        console.print(f"[yellow]note:[/yellow] {line}", highlight=False)
