"""``deltakit demo``: the paper's Tables 1-2 in miniature, offline: a close and a far model family, every method."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
from rich.table import Table

from deltakit.cli._common import (
    console,
    force_option,
    json_option,
    progress_bar,
    write_json,
)
from deltakit.demo.settings import LABELS, METHODS, QUICK, DemoSettings, StudySettings

_S = StudySettings()


@click.command("demo")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--quick", is_flag=True, help=f"A smaller run: {QUICK['n_test']} test questions, {QUICK['steps']} fine-tuning "
              f"steps on {QUICK['n_train']} examples (the family is the same).")
@click.option("--methods", default=None, help=f"Comma-separated subset of the methods (default all: {','.join(METHODS)}).")
@click.option("--steps", type=int, default=None, help=f"SFT and DRIFT optimizer steps [default: {_S.steps}; --quick {QUICK['steps']}].")
@click.option("--n-train", type=int, default=None, help=f"Multimodal CoT training examples [default: {_S.n_train}].")
@click.option("--n-test", type=int, default=None, help=f"Multimodal test questions [default: {_S.n_test}].")
@click.option("--n-heldout", type=int, default=None, help=f"Held-out CoT conversations for the CoT loss [default: {_S.n_heldout}].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fine-tuning runs and of DARE.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Family cache folder [default: $XDG_CACHE_HOME/deltakit or ~/.cache/deltakit].")
@force_option
@json_option
def command(out: Path, quick: bool, methods: str | None, steps: int | None, n_train: int | None, n_test: int | None,
            n_heldout: int | None, seed: int, cache: Path | None, force: bool, json_path: Path | None) -> None:
    """Build (or reuse) the miniature family, run every method on its close and far MLLM, print the table.

    Offline on a CPU: a base Qwen2 LM, a reasoner, a close and a far Qwen2.5-VL MLLM (cached after the
    first run), then diff, the merges (BR2V, task arithmetic, TIES, DARE-TIES, layer swap), SFT and DRIFT
    (each rule, attention / MLP / both priors) and eval on the multimodal test set. Every artifact, the
    figures and demo.json land in OUT; docs/demo.md and docs/study.md explain each number.
    """
    import transformers

    from deltakit.demo import run_demo

    settings = DemoSettings.quick(seed=seed) if quick else DemoSettings(seed=seed)
    changes = {k: v for k, v in dict(steps=steps, n_train=n_train, n_test=n_test, n_heldout=n_heldout).items() if v is not None}
    if methods is not None:
        changes["methods"] = tuple(m.strip() for m in methods.split(",") if m.strip())
    settings = replace(settings, study=replace(settings.study, **changes))
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    with progress_bar() as progress:
        report = run_demo(out, settings, force=force, progress=progress, cache=cache)
    fam = "built" if report.family_built else "reused"
    console.print(f"[bold]family[/bold]: {fam} in {report.family_seconds:.0f} s ({report.family})")
    s = settings.study
    table = Table(title=f"deltakit demo: {report.seconds:.0f} s, seed {seed}, {s.n_test} test questions, {s.steps} SFT/DRIFT steps")
    table.add_column("method")
    for f in ("close", "far"):
        table.add_column(f"{f}: acc.", justify="right")
        table.add_column(f"{f}: CoT loss", justify="right")
    p = report.pairs
    table.add_row("[italic]diff verdict (cos / rel. L2)[/italic]",
                  *[c for f in ("close", "far") for c in (p[f]["verdict"], f"{p[f]['median_layer_cosine']:.3f} / "
                                                                           f"{p[f]['median_layer_rel_l2']:.3f}")])
    for m in s.methods:
        cells = []
        for f in ("close", "far"):
            r = report.table[f][m]
            cells += [f"{100 * r['accuracy']:.1f}%", f"{r['cot_loss']:.3f}"]
        table.add_row(LABELS[m], *cells)
    console.print(table)
    for f in ("close", "far"):
        v = report.verdicts[f]
        above = ", ".join(LABELS[m] for m in v["merges_above_base"]) or "none"
        console.print(f"{f}: diff says [bold]{v['diff_verdict']}[/bold] (merging {'should' if v['predicts_merging_helps'] else 'should not'} "
                      f"help); merges above the MLLM: {above} -> prediction {'right' if v['prediction_right'] else 'wrong'}")
    console.print("acc.: greedy test accuracy; CoT loss: token loss on held-out chain-of-thought answers. One seed: "
                  "docs/study.md has the means and 95% intervals over seeds.")
    console.print(f"artifacts in {out} (summary: {out / 'demo.json'}, figures in {out / 'figures'})")
    write_json(json_path, report)
