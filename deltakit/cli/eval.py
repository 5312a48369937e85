"""``deltakit eval``: accuracy of a model on a MathVista-style benchmark, overall and per category."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from deltakit.cli._common import console, json_option, progress_bar, write_json


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Benchmark JSONL (question, image, choices, answer, answer_type, precision, category); see docs/eval.md.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Questions per generation batch (left-padded).")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Generation budget per question.")
@click.option("--limit", type=int, default=None, help="Only the first N questions.")
@click.option("--device", default=None, help="torch device [cuda if available, else cpu].")
@click.option("--predictions", "predictions_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write each prediction as one JSON line to this file as soon as it is scored (replaced at the "
                   "start; an interrupted run keeps what it did) [with --json OUT.json: OUT.predictions.jsonl].")
@json_option
def command(model: Path, data_path: Path, batch_size: int, max_new_tokens: int, limit: int | None, device: str | None,
            predictions_path: Path | None, json_path: Path | None) -> None:
    """Greedy-generate an answer to every question with MODEL's own processor and chat template, and score it.

    Works on a base MLLM and on `deltakit merge` / `deltakit finetune` outputs alike. --json writes every prediction.
    """
    from deltakit.evaluate import evaluate

    if predictions_path is None and json_path is not None and str(json_path) != "-":
        predictions_path = json_path.with_suffix(".predictions.jsonl")
    with progress_bar() as progress:
        report = evaluate(model, data_path, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                          limit=limit, device=device, predictions_path=predictions_path)
    table = Table(title=f"{model} on {data_path.name}")
    for col in ("category", "questions", "correct", "accuracy"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for name, row in report.categories.items():
        table.add_row(name, str(row["examples"]), str(row["correct"]), f"{row['accuracy']:.1%}")
    table.add_section()
    table.add_row("[bold]all[/bold]", str(report.examples), str(report.correct), f"[bold]{report.accuracy:.1%}[/bold]")
    console.print(table)
    console.print(f"{report.unanswered} without a usable answer; {report.seconds:.1f} s on {report.device} ({report.dtype})")
    write_json(json_path, report)
