"""DRIFT rule x alpha sweep on the built-in demo: held-out CoT loss and distance to the reasoner vs plain SFT.

Each point is one deterministic ``deltakit demo`` run (same data, base, reasoner and SFT run; only the
DRIFT rule and alpha change). Writes the table to docs/drift-sweep.md, the figure to
docs/figures/drift_sweep.png and the raw numbers to docs/benchmarks/drift_sweep.json.

    python analyses/drift_sweep.py [--alphas 0.1,0.3,1] [--steps 40] [--render-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deltakit.demo import run_demo  # noqa: E402
from deltakit.demo_settings import DemoSettings  # noqa: E402
from deltakit.drift_rules import RULES  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def sweep(alphas: list[float], steps: int) -> dict:
    """Run the demo for every rule and alpha; SFT (identical in every run) is taken from the first."""
    rows, sft = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for rule in RULES:
            for alpha in alphas:
                started = time.perf_counter()
                report = run_demo(Path(tmp) / f"{rule}-{alpha}", DemoSettings(steps=steps, rule=rule, drift_alpha=alpha))
                drift = report.models["drift"]
                sft = sft or report.models["sft"]
                rows.append({"rule": rule, "alpha": alpha, "heldout_loss": drift.heldout_loss,
                             "reasoner_distance": drift.reasoner_distance, "update_cos_prior": drift.update_cos_prior,
                             "accuracy": drift.accuracy, "seconds": time.perf_counter() - started})
                print(f"{rule:9s} alpha {alpha:<4g} loss {drift.heldout_loss:.3f} to-reasoner {drift.reasoner_distance:.3f}",
                      flush=True)
    return {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "steps": steps, "alphas": alphas,
            "sft": {"heldout_loss": sft.heldout_loss, "reasoner_distance": sft.reasoner_distance,
                    "update_cos_prior": sft.update_cos_prior, "accuracy": sft.accuracy},
            "rows": rows}


def render(result: dict) -> str:
    """The markdown page: the table and how to read it."""
    sft = result["sft"]
    lines = ["| run | alpha | held-out CoT loss | to reasoner | cos(u, D) | accuracy |", "|---|---|---|---|---|---|",
             f"| plain SFT | - | {sft['heldout_loss']:.3f} | {sft['reasoner_distance']:.3f} | {sft['update_cos_prior']:.3f} | "
             f"{sft['accuracy']:.0%} |"]
    for r in result["rows"]:
        lines.append(f"| DRIFT {r['rule']} | {r['alpha']:g} | {r['heldout_loss']:.3f} | {r['reasoner_distance']:.3f} | "
                     f"{r['update_cos_prior']:.3f} | {r['accuracy']:.0%} |")
    best = min(result["rows"], key=lambda r: r["heldout_loss"])
    closest = min(result["rows"], key=lambda r: r["reasoner_distance"])
    beyond = [f"{r['rule']} {r['alpha']:g}" for r in result["rows"] if r["reasoner_distance"] > 1]
    findings = [
        f"- Lowest held-out loss: DRIFT {best['rule']} at alpha {best['alpha']:g} ({best['heldout_loss']:.3f}; SFT "
        f"{sft['heldout_loss']:.3f}). Closest to the reasoner: DRIFT {closest['rule']} at alpha {closest['alpha']:g} "
        f"({closest['reasoner_distance']:.3f}; SFT {sft['reasoner_distance']:.3f}).",
        f"- Ending farther from the reasoner than the base was (to reasoner > 1): "
        f"{', '.join(beyond) or 'none'}. The absolute rule adds `alpha * D` whatever the gradient's size, so",
        "  its strength depends on |D| / |g|; gradnorm and adaptive scale the prior term to |g| and stay near",
        "  the reasoner at small alpha, adaptive the most steadily (it halves the pull when g and D disagree).",
    ]
    return "\n".join([
        "# DRIFT rules and alpha on the demo",
        "",
        f"`python analyses/drift_sweep.py` on {result['date']}, 2-core CPU container, no GPU. Every row is one",
        f"deterministic `deltakit demo` run ({result['steps']} SFT/DRIFT steps at lr 3e-3, see [demo.md](demo.md)) that",
        "differs from the others only in the DRIFT rule and alpha; plain SFT is the same run in all of them.",
        "Lower held-out loss is better; `to reasoner` is `|theta - theta_reasoner| / |theta_base - theta_reasoner|`",
        "on the prior's tensors (1 = as far as the base), `cos(u, D)` the cosine between the update and the prior.",
        "",
        "![held-out loss and distance to the reasoner per rule and alpha](figures/drift_sweep.png)",
        "",
        *lines,
        "",
        *findings,
        "",
        "Raw numbers: [benchmarks/drift_sweep.json](benchmarks/drift_sweep.json). At this learning rate (3000x the",
        "paper's) AdamW turns a constant prior term into near full-size steps, so large alphas overshoot the",
        "reasoner; the paper's alpha 1 belongs with its lr 1e-6. Accuracy on 20 questions moves in steps of 5 points",
        "and says little at this size.",
        "",
    ])


def plot(result: dict, path: Path) -> None:
    """Held-out loss and distance to the reasoner against alpha, one line per rule, SFT as a dashed line."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(axes, ("heldout_loss", "reasoner_distance"), ("held-out CoT loss", "distance to reasoner")):
        for rule in RULES:
            rows = [r for r in result["rows"] if r["rule"] == rule]
            ax.plot([r["alpha"] for r in rows], [r[key] for r in rows], marker="o", label=f"DRIFT {rule}")
        ax.axhline(result["sft"][key], color="black", linestyle="--", label="plain SFT")
        ax.set_xscale("log")
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", default="0.1,0.3,1")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--render-only", action="store_true", help="Redraw the page and figure from the saved JSON.")
    args = parser.parse_args()
    raw = DOCS / "benchmarks" / "drift_sweep.json"
    if args.render_only:
        result = json.loads(raw.read_text())
    else:
        result = sweep([float(a) for a in args.alphas.split(",")], args.steps)
        raw.parent.mkdir(exist_ok=True)
        raw.write_text(json.dumps(result, indent=2) + "\n")
    (DOCS / "drift-sweep.md").write_text(render(result))
    plot(result, DOCS / "figures" / "drift_sweep.png")
    print(render(result))


if __name__ == "__main__":
    main()
