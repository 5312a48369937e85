"""``deltakit merge``: naive-merge baselines that write a loadable multimodal checkpoint."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from deltakit.cli._common import console, force_option, json_option, progress_bar, selection_options, threads_option, write_json
from deltakit.errors import DeltakitError
from deltakit.merge.config import METHODS, OUT_DTYPES, MergeConfig


_RECIPE_FLAGS = ("mllm", "llm", "method", "alpha", "base", "density", "lambda_", "keep_layers", "t", "modules", "layers",
                 "skip_first", "include", "exclude", "out_dtype", "seed")


@click.command("merge")
@click.argument("args", nargs=-1, required=True, metavar="[CONFIG.yaml] OUT")
@click.option("--mllm", help="The multimodal model (its layout, vision tower and files are kept).")
@click.option("--llm", help="The text-only (reasoning) model merged into the MLLM's text tower.")
@click.option("--method", type=click.Choice(list(METHODS)), default="linear", show_default=True)
@click.option("--alpha", type=float, default=0.9, show_default=True, help="Weight of the MLLM (the LLM gets 1 - alpha).")
@click.option("--base", help="Base model (the deltas' common ancestor) for the methods that take one; slerp and nearswap: "
              "default the MLLM.")
@click.option("--density", type=float, help="Fraction of each delta kept (ties, dare_*, breadcrumbs*, della*).")
@click.option("--lambda", "lambda_", type=float, help="Scale of the merged delta (task_arithmetic, ties, dare_*, ...).")
@click.option("--keep-layers", type=int, help="layer_swap: the first K layers keep the MLLM's weights (default 5).")
@click.option("--t", "t", type=float, help="slerp: the LLM's share (default 1 - alpha); nearswap: the distance threshold.")
@selection_options("merge")
@click.option("--out-dtype", type=click.Choice(list(OUT_DTYPES)), help="dtype of the written tensors (default: the MLLM's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random drop.")
@threads_option
@force_option
@json_option
def command(args: tuple[str, ...], mllm: str | None, llm: str | None, method: str, alpha: float, base: str | None,
            density: float | None, lambda_: float | None, keep_layers: int | None, t: float | None, modules: str, layers: str | None,
            skip_first: int, include: str | None, exclude: str | None, out_dtype: str | None, seed: int,
            threads: int | None, force: bool, json_path: Path | None) -> None:
    """Merge a text LLM into an MLLM's text tower: `merge --mllm A --llm B OUT` or `merge CONFIG.yaml OUT`."""
    from deltakit.merge import merge

    if len(args) == 2:
        ctx = click.get_current_context()
        given = [f"--{p.name.rstrip('_').replace('_', '-')}" for p in ctx.command.params
                 if p.name in _RECIPE_FLAGS and ctx.get_parameter_source(p.name) != click.core.ParameterSource.DEFAULT]
        if given:
            raise DeltakitError(f"{', '.join(given)} cannot be combined with CONFIG.yaml (the file sets the whole recipe)")
        config: MergeConfig = MergeConfig.from_yaml(args[0])
    elif len(args) == 1:
        if not (mllm and llm):
            raise DeltakitError("without a CONFIG.yaml, both --mllm and --llm are needed")
        config = MergeConfig.simple(mllm, llm, method=method, alpha=alpha, base=base, density=density, lambda_=lambda_,
                                    keep_layers=keep_layers, t=t, modules=modules, layers=layers, skip_first=skip_first,
                                    include=include, exclude=exclude, out_dtype=out_dtype, seed=seed)
    else:
        raise DeltakitError(f"expected [CONFIG.yaml] OUT, got {len(args)} arguments")
    with progress_bar() as progress:
        report = merge(config, args[-1], force=force, progress=progress, threads=threads)
    write_json(json_path, report)
    if json_path is not None and str(json_path) == "-":
        return
    table = Table(title=f"deltakit merge: {report.method}", show_header=False)
    table.add_row("output", str(report.out))
    table.add_row("MLLM (layout kept)", report.mllm)
    for i in report.inputs:
        table.add_row(i["role"], f"{i['path']} ({i['family']})")
    table.add_row("tensors", f"{report.merged} merged, {report.copied} copied")
    table.add_row("written", f"{report.bytes_written / 1e9:.2f} GB in {report.seconds:.1f} s")
    console.print(table)
    for line in report.warnings + report.notes:
        console.print(f"[yellow]note:[/yellow] {line}", highlight=False)
