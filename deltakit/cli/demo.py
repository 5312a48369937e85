"""``deltakit demo``: the whole pipeline (diff, merge, prior, SFT vs DRIFT, eval) on tiny models, offline."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from deltakit.cli._common import console, force_option, json_option, progress_bar, write_json
from deltakit.demo_settings import MODELS, DemoSettings
from deltakit.drift_rules import RULES

_LABELS = {"base": "base", "merged": "merged", "sft": "SFT", "drift": "DRIFT"}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@click.command("demo")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", type=int, default=DemoSettings.steps, show_default=True, help="Optimizer steps of the SFT and DRIFT runs.")
@click.option("--reasoner-steps", type=int, default=DemoSettings.reasoner_steps, show_default=True,
              help="Steps that teach the partner LLM the text-only chain of thought.")
@click.option("--n-train", type=int, default=DemoSettings.n_train, show_default=True, help="Training conversations.")
@click.option("--n-bench", type=int, default=DemoSettings.n_bench, show_default=True, help="Benchmark questions.")
@click.option("--max-new-tokens", type=int, default=DemoSettings.max_new_tokens, show_default=True, help="Generation budget in eval.")
@click.option("--lr", type=float, default=DemoSettings.lr, show_default=True, help="Peak learning rate of every training run.")
@click.option("--rule", type=click.Choice(RULES), default=DemoSettings.rule, show_default=True, help="DRIFT rule.")
@click.option("--drift-alpha", type=float, default=DemoSettings.drift_alpha, show_default=True,
              help="DRIFT strength (the paper uses 1 at lr 1e-6; see docs/demo.md).")
@click.option("--seed", type=int, default=DemoSettings.seed, show_default=True, help="Seed of the models, data and training.")
@force_option
@json_option
def command(out: Path, steps: int, reasoner_steps: int, n_train: int, n_bench: int, max_new_tokens: int, lr: float,
            rule: str, drift_alpha: float, seed: int, force: bool, json_path: Path | None) -> None:
    """Build a tiny Qwen2.5-VL model, a partner reasoning LLM and synthetic data, then run every stage into OUT.

    Offline, seconds on a CPU: diff of the pair, linear merge, prior export, plain SFT vs DRIFT, and eval
    of base, merged, SFT and DRIFT. OUT/demo.json holds the summary; docs/demo.md explains each number.
    """
    import transformers

    from deltakit.demo import run_demo

    settings = DemoSettings(steps=steps, reasoner_steps=reasoner_steps, n_train=n_train, n_bench=n_bench,
                            max_new_tokens=max_new_tokens, lr=lr, rule=rule, drift_alpha=drift_alpha, seed=seed)
    transformers.utils.logging.disable_progress_bar()
    with progress_bar() as progress:
        report = run_demo(out, settings, force=force, progress=progress)
    d = report.diff
    console.print(f"[bold]pair[/bold]: {d['verdict_text']} (median layer cosine {d['median_layer_cosine']:.3f}, "
                  f"relative L2 {d['median_layer_rel_l2']:.3f}, {d['matched_tensors']} tensors)")
    r = report.finetune["reasoner"]
    console.print(f"[bold]partner LLM[/bold]: the base's text tower after {r['steps']} steps on the text-only chain of "
                  f"thought; held-out text-only CoT loss {r['heldout_text_loss']['reasoner']:.3f} "
                  f"(base {r['heldout_text_loss']['base']:.3f})")
    console.print(f"[bold]prior[/bold]: {report.prior['tensors']} tensors, {report.prior['parameters']:,} parameters, "
                  f"{report.prior['dtype']}; DRIFT {settings.rule}, alpha {settings.drift_alpha:g}")
    table = Table(title=f"deltakit demo: {report.seconds:.0f} s, {n_bench} benchmark questions")
    for col in ("model", "acc.", "no answer", "CoT loss", "train loss", "cos(u,D)", "|u|", "to reasoner"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in MODELS:
        m = report.models[name]
        train = report.finetune.get(name)
        table.add_row(_LABELS[name], f"{m.accuracy:.0%}", str(m.unanswered), f"{m.heldout_loss:.3f}",
                      _fmt(train and train["final_loss"], ".3f"), _fmt(m.update_cos_prior, ".3f"), f"{m.update_norm:.3g}",
                      f"{m.reasoner_distance:.3f}")
    console.print(table)
    console.print("acc.: benchmark accuracy; CoT loss: token loss on held-out chain-of-thought answers; u = weights - base "
                  "weights and D = reasoner - base on the prior's tensors; to reasoner: |weights - reasoner| / |base - reasoner|.")
    console.print(f"artifacts in {out} (summary: {out / 'demo.json'})")
    write_json(json_path, report)
