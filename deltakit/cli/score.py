"""``deltakit score``: score predictions made anywhere (vLLM, lmms-eval, VLMEvalKit) with a benchmark's official rules."""

from __future__ import annotations

from pathlib import Path

import click

from deltakit.cli._common import benchmark_options, json_option, print_score, write_json


@click.command("score")
@benchmark_options
@click.option("--predictions", "predictions_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL with the benchmark's id field (or 'id') and 'prediction' (the raw model output), or a "
                   "VLMEvalKit prediction .xlsx/.tsv ('index', 'prediction').")
@json_option
def command(data_path: Path, format: str | None, lenient: bool, export_tsv: Path | None, predictions_path: Path,
            json_path: Path | None) -> None:
    """Score PREDICTIONS against the benchmark file --data: overall and per-category accuracy, and every item's
    extracted answer and verdict (--json). No model, no GPU, no network.
    """
    from deltakit.benchmarks import score

    report = score(data_path, predictions_path, format, lenient=lenient)
    print_score(report, f"{predictions_path.name} on {data_path.name}")
    if export_tsv is not None:
        from deltakit.benchmarks import load
        from deltakit.benchmarks.predictions import write_vlmevalkit_tsv

        write_vlmevalkit_tsv(export_tsv, load(data_path, format)[1], report.predictions)
    write_json(json_path, report)
