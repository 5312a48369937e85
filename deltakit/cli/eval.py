"""``deltakit eval``: generate answers on a benchmark with a model, then score them with the benchmark's official rules."""

from __future__ import annotations

from pathlib import Path

import click

from deltakit.cli._common import (benchmark_options, console, json_option, print_score, progress_bar, revision_option,
                                  write_json)


@click.command("eval")
@click.argument("model")
@benchmark_options
@revision_option
@click.option("--batch-size", type=int, default=8, show_default=True, help="Questions per generation batch (left-padded).")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Generation budget per question.")
@click.option("--limit", type=int, default=None, help="Only the first N questions.")
@click.option("--device", default=None, help="torch device [cuda if available, else cpu].")
@click.option("--prompt", default=None,
              help="Prompt template over the record's fields instead of the benchmark's own, e.g. '{query_wo}' or "
                   "'Question: {question} Put the answer in \\boxed{{}}.' (literal braces doubled).")
@click.option("--enable-thinking/--disable-thinking", "thinking", default=None,
              help="Pass enable_thinking to the chat template (Qwen3-style thinking switch) [template default].")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 decodes greedily; above 0 samples.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (with --temperature > 0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (each batch seeded from it and its first question).")
@click.option("--predictions", "predictions_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append each prediction as one JSON line to this file as soon as it is made (replaced at the start "
                   "unless --resume) [with --json OUT.json: OUT.predictions.jsonl].")
@click.option("--resume", is_flag=True, help="Continue an interrupted eval: keep the predictions file and generate only the questions it lacks.")
@json_option
def command(model: str, data_path: Path, format: str | None, lenient: bool, export_tsv: Path | None, revision: str | None,
            batch_size: int, max_new_tokens: int, limit: int | None, device: str | None, prompt: str | None,
            thinking: bool | None, temperature: float, top_p: float, seed: int, predictions_path: Path | None,
            resume: bool, json_path: Path | None) -> None:
    """Generate an answer to every question with MODEL (a folder or a hub ID org/name[@rev]) through its own processor
    and chat template, then score them as `deltakit score` does.

    Works on a base MLLM and on `deltakit merge` / `deltakit finetune` outputs alike. --json writes every prediction.
    """
    from deltakit.evaluate import Sampling, evaluate

    if predictions_path is None and json_path is not None and str(json_path) != "-":
        predictions_path = json_path.with_suffix(".predictions.jsonl")
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    with progress_bar() as progress:
        report = evaluate(model, data_path, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                          limit=limit, device=device, predictions_path=predictions_path, format=format, revision=revision,
                          resume=resume, prompt=prompt, sampling=Sampling(temperature, top_p, seed),
                          chat_template_kwargs=kwargs, lenient=lenient)
    print_score(report, f"{model} on {data_path.name}")
    tail = f" ({report.resumed} from the predictions file)" if report.resumed else ""
    console.print(f"{report.seconds:.1f} s on {report.device or 'no device (all resumed)'} ({report.dtype or '-'}){tail}")
    if export_tsv is not None:
        from deltakit.benchmarks import load
        from deltakit.benchmarks.predictions import write_vlmevalkit_tsv

        write_vlmevalkit_tsv(export_tsv, load(data_path, format, limit)[1], report.predictions)
    write_json(json_path, report)
