"""``deltakit diff A B``: how far apart two checkpoints' text towers are (tables, JSON, CSV, a Figure-2-style plot)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from deltakit.cli._common import console, err_console, json_option, pickle_option, progress_bar, selection_options, threads_option, write_json

if TYPE_CHECKING:
    from deltakit.diagnostics import DiffReport, Stats

_STYLE = {"close": "bold green", "moderate": "bold yellow", "far": "bold red"}


def _f(v: float, digits: int = 4) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _g(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _stats_table(title: str, label: str, rows: list[tuple[str, Stats]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in (label, "cosine", "L2 |A-B|", "|A|", "|B|", "rel L2"):
        table.add_column(col, justify="left" if col == label else "right")
    for name, s in rows:
        table.add_row(name, _f(s.cosine), _g(s.l2), _g(s.norm_a), _g(s.norm_b), _f(s.rel_l2))
    return table


def render(report: DiffReport, per_tensor: bool) -> None:
    """Print per-layer and per-kind tables (and per-tensor if asked), then the summary and its verdict, last in view."""
    summary = Table(title="deltakit diff", show_header=False, title_justify="left")
    summary.add_row("A", f"{report.a} ({report.family_a})")
    summary.add_row("B", f"{report.b} ({report.family_b})")
    summary.add_row("matched tensors", f"{len(report.tensors)} ({report.overall.numel:,} parameters)")
    summary.add_row("only in A / only in B", f"{len(report.only_a)} / {len(report.only_b)}")
    summary.add_row("median layer cosine", _f(report.median_layer_cosine))
    summary.add_row("median layer L2 (relative)", f"{_g(report.median_layer_l2)} ({_f(report.median_layer_rel_l2)})")
    summary.add_row("whole text tower", f"cosine {_f(report.overall.cosine)}, L2 {_g(report.overall.l2)}")
    summary.add_row("read", f"{report.bytes_read / 1e9:.2f} GB in {report.seconds:.1f} s")
    console.print(_stats_table("per layer", "layer", [(str(i), s) for i, s in report.layers.items()]))
    console.print(_stats_table("per module kind", "kind", list(report.kinds.items())))
    if per_tensor:
        console.print(_stats_table("per tensor", "tensor", [(t.canonical, t.stats) for t in report.tensors]))
    console.print(summary)
    console.print(f"verdict: [{_STYLE[report.verdict]}]{report.verdict_text}[/]", highlight=False, soft_wrap=True)
    for name, sa, sb in report.shape_mismatch:
        console.print(f"[yellow]shape mismatch:[/yellow] {name}: A {list(sa)} vs B {list(sb)}", highlight=False, soft_wrap=True)
    for side, names in (("A", report.only_a), ("B", report.only_b)):
        if names:
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            console.print(f"[yellow]only in {side}:[/yellow] {', '.join(names[:5])}{more}", highlight=False, soft_wrap=True)
    for line in report.notes:
        console.print(f"[yellow]note:[/yellow] {line}", highlight=False, soft_wrap=True)
    for line in report.warnings:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {line}", highlight=False, soft_wrap=True)


def write_csv(report: DiffReport, path: Path) -> None:
    """One row per matched tensor with the columns of the JSON per-tensor record (shapes as ``AxB``, NaN empty)."""
    from deltakit.diagnostics import tensor_record
    from deltakit.io.writer import write_file_atomic

    records = [tensor_record(t) for t in report.tensors]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(records[0]))
    writer.writeheader()
    for r in records:
        r["shape_a"] = "x".join(map(str, r["shape_a"]))
        r["shape_b"] = "x".join(map(str, r["shape_b"]))
        writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v for k, v in r.items()})
    write_file_atomic(path, text.getvalue().encode())


def plot(report: DiffReport, path: Path) -> None:
    """Per-layer cosine and L2 curves and per-module-kind bars, like the paper's Figure 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from deltakit.diagnostics import CLOSE_COSINE, FAR_COSINE
    from deltakit.io.writer import write_file_atomic

    layers = list(report.layers)
    kinds = list(report.kinds)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    ax = axes[0]
    ax.plot(layers, [report.layers[i].cosine for i in layers], marker="o", ms=3, color="tab:blue")
    for y, label in ((CLOSE_COSINE, "close"), (FAR_COSINE, "far")):
        ax.axhline(y, ls="--", lw=0.8, color="gray")
        ax.annotate(label, (1.0, y), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=8, color="gray")
    ax.set(title="cosine(A, B) per layer", xlabel="layer", ylabel="cosine similarity")
    ax = axes[1]
    ax.plot(layers, [report.layers[i].l2 for i in layers], marker="o", ms=3, color="tab:red")
    ax.set(title="L2 |A - B| per layer", xlabel="layer", ylabel="L2 distance")
    ax = axes[2]
    ax.bar(kinds, [report.kinds[k].cosine for k in kinds], color="tab:blue")
    lo = min((report.kinds[k].cosine for k in kinds if math.isfinite(report.kinds[k].cosine)), default=0.0)
    ax.set_ylim(max(0.0, lo - 0.05) if lo > 0 else min(lo - 0.05, 0.0), 1.0)
    ax.set(title="cosine per module kind", ylabel="cosine similarity")
    ax.tick_params(axis="x", rotation=45)
    l2ax = ax.twinx()
    l2ax.plot(kinds, [report.kinds[k].l2 for k in kinds], "o", color="tab:red")
    l2ax.set_ylabel("L2 distance (dots)", color="tab:red")
    for a in axes[:2]:
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"A: {Path(report.a).name} ({report.family_a})   B: {Path(report.b).name} ({report.family_b})   "
                 f"-> {report.verdict_text}", fontsize=11)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=path.suffix[1:] or None, dpi=130)
    plt.close(fig)
    write_file_atomic(path, image.getvalue())


@click.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--family-a", default=None, help="Override the detected family of A.")
@click.option("--family-b", default=None, help="Override the detected family of B.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Per-tensor figures as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="A PNG with per-layer cosine and L2 curves and per-module bars.")
@click.option("--per-tensor", is_flag=True, help="Also print the per-tensor table.")
@selection_options("diff")
@threads_option
@pickle_option
@json_option
def command(a: Path, b: Path, family_a: str | None, family_b: str | None, csv_path: Path | None, plot_path: Path | None,
            per_tensor: bool, modules: str, layers: str | None, skip_first: int, include: str | None,
            exclude: str | None, threads: int | None, allow_pickle: bool, json_path: Path | None) -> None:
    """Compare the text towers of A (usually the MLLM) and B (usually the reasoning LLM) tensor by tensor."""
    from deltakit.diagnostics import diff
    from deltakit.engine.selection import Selection

    selection = Selection.parse(modules, layers, skip_first, include, exclude)
    with progress_bar() as progress:
        report = diff(a, b, family_a=family_a, family_b=family_b, allow_pickle=allow_pickle, progress=progress,
                      threads=threads, selection=selection)
    write_json(json_path, report)
    if csv_path is not None:
        write_csv(report, csv_path)
    if plot_path is not None:
        plot(report, plot_path)
    if json_path is not None and str(json_path) == "-":
        return
    render(report, per_tensor)
