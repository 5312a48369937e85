"""The study: every method on both MLLMs of the miniature family, and its tables and figures from JSON.

:func:`run_config` runs one configuration (one seed) through the public deltakit API, the way a user runs
it on real checkpoints: ``diff`` of each (MLLM, reasoner) pair, the merges (``merge``), the priors
(``export_prior``: attention + MLP, attention only, MLP only), SFT and DRIFT (``finetune``), and
``evaluate`` of every model on the multimodal test set, plus each model's held-out CoT loss. It returns
(and writes) one JSON-ready dict. :func:`aggregate` combines the dicts of several seeds into mean and 95%
confidence interval per method and family; :func:`markdown_table`, :func:`plot_pairs` and
:func:`plot_accuracy` draw from that JSON only (``analyses/study.py --from-json``).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deltakit.demo.settings import LABELS, MERGES, SEEDED, StudySettings
from deltakit.progress import ProgressFn, no_progress

FAMILIES = ("close", "far")
# Two-sided 95% Student-t quantiles by degrees of freedom (1..30); the normal 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (t-based; 0 for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


# -- running ------------------------------------------------------------------------------------------------

def cot_loss(model_path: Path, data: Path, batch_size: int = 50) -> float:
    """Mean next-token cross-entropy per assistant token of a sharegpt JSONL of image + question / CoT answer
    chats (rendered with the model's own chat template and processor), float32."""
    import torch
    import transformers
    from PIL import Image

    from deltakit.tiny import SPECIAL

    processor = transformers.AutoProcessor.from_pretrained(model_path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    header = processor.tokenizer("<|im_start|>assistant\n").input_ids
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            texts, images = [], []
            for rec in chunk:
                user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
                msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user.replace("<image>", "")}]},
                        {"role": "assistant", "content": answer}]
                texts.append(processor.apply_chat_template(msgs, tokenize=False))
                with Image.open(data.parent / rec["images"][0]) as im:
                    images.append(im.convert("RGB"))
            enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
            labels = torch.full_like(enc["input_ids"], -100)
            for r, row in enumerate(enc["input_ids"].tolist()):
                n = int(enc["attention_mask"][r].sum())
                start = max(j for j in range(n) if row[j:j + len(header)] == header) + len(header)
                end = row.index(SPECIAL["im_end"], start) + 1
                labels[r, start:end] = enc["input_ids"][r, start:end]
            logits = model(**enc).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


def pair_summary(report: Any) -> dict[str, Any]:
    """What the study keeps of a :class:`~deltakit.diagnostics.DiffReport`: the verdict, medians, per-layer stats."""
    return {"verdict": report.verdict, "median_layer_cosine": report.median_layer_cosine,
            "median_layer_l2": report.median_layer_l2, "median_layer_rel_l2": report.median_layer_rel_l2,
            "overall_cosine": report.overall.cosine,
            "layers": {str(i): {"cosine": s.cosine, "l2": s.l2, "rel_l2": s.rel_l2} for i, s in sorted(report.layers.items())}}


def _merge_config(method: str, mllm: Path, reasoner: Path, base: Path, s: StudySettings, seed: int) -> Any:
    from deltakit.merge import MergeConfig

    if method == "linear":
        return MergeConfig.simple(str(mllm), str(reasoner), "linear", s.merge_alpha)
    if method == "layer_swap":
        return MergeConfig.simple(str(mllm), str(reasoner), "layer_swap", s.merge_alpha, keep_layers=s.keep_layers)
    params = {"lambda": 1.0} if method == "task_arithmetic" else {"lambda": 1.0, "density": s.density}
    return MergeConfig.from_dict({
        "merge_method": method, "mllm": str(mllm), "base_model": str(base),
        "models": [{"model": str(mllm), "parameters": {"weight": 1.0}}, {"model": str(reasoner), "parameters": {"weight": 1.0}}],
        "parameters": params, "seed": seed})


def run_config(family: Any, s: StudySettings, seed: int, root: Path, progress: ProgressFn = no_progress,
               keep_models: bool = True, log: Any = print) -> dict[str, Any]:
    """Run every method of ``s.methods`` on both MLLMs of ``family`` with ``seed`` into ``root`` (data, priors,
    models, reports); returns the configuration's JSON (also written to ``root/study.json``).

    ``keep_models`` False deletes each model folder once scored (the study over seeds keeps only reports)."""
    from deltakit.demo.task import write_task_data
    from deltakit.diagnostics import diff
    from deltakit.evaluate import evaluate
    from deltakit.merge import merge
    from deltakit.prior import export_prior
    from deltakit.train import TrainConfig, finetune

    s = s.validated()
    started = time.perf_counter()
    cpu = time.process_time()
    data = write_task_data(root / "data", s.n_train, s.n_test, s.n_heldout, seed=0)
    reports = root / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"seed": seed, "settings": asdict(s), "family": family.info, "pairs": {}, "results": {}}
    for fam in FAMILIES:
        mllm = family.path(fam)
        report = diff(mllm, family.reasoner, progress=progress)
        (reports / f"diff-{fam}.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        out["pairs"][fam] = pair_summary(report)
        priors = {}
        for name, modules in (("both", "attn,mlp"), ("attn", "attn"), ("mlp", "mlp")):
            priors[name] = root / "priors" / f"{fam}-{name}.safetensors"
            priors[name].parent.mkdir(exist_ok=True)
            if not priors[name].exists():
                export_prior(mllm, family.reasoner, priors[name], modules=modules, dtype="float32", progress=progress)
        results: dict[str, Any] = {}
        for method in s.methods:
            t0 = time.perf_counter()
            path = mllm if method == "base" else root / "models" / fam / method
            extra: dict[str, Any] = {}
            if method in MERGES:
                merge(_merge_config(method, mllm, family.reasoner, family.base, s, seed), path, progress=progress)
            elif method != "base":
                kw: dict[str, Any] = {}
                if method.startswith("drift_"):
                    _, rule, *part = method.split("_")
                    kw = dict(prior=str(priors[part[0] if part else "both"]), rule=rule, alpha=s.drift_alpha)
                run = finetune(TrainConfig(model=str(mllm), data=str(data.train), out=str(path),
                                           run_dir=str(root / "runs" / fam / method), max_steps=s.steps, lr=s.lr,
                                           batch_size=s.batch_size, warmup_ratio=s.warmup_ratio, seed=seed, **kw),
                               progress=progress)
                extra = {"train_loss": run.final_loss, "drift_tensors": run.drift_tensors}
            ev = evaluate(path, data.test, batch_size=s.eval_batch, max_new_tokens=s.max_new_tokens, progress=progress)
            (reports / f"eval-{fam}-{method}.json").write_text(json.dumps(ev.to_dict(), indent=1) + "\n")
            results[method] = {"accuracy": ev.accuracy, "correct": ev.correct, "unanswered": ev.unanswered,
                               "cot_loss": cot_loss(path, data.heldout), **extra,
                               "seconds": round(time.perf_counter() - t0, 1)}
            log(f"  {fam:5s} {method:22s} acc {ev.accuracy:.3f} cot-loss {results[method]['cot_loss']:.3f} "
                f"({results[method]['seconds']:.0f} s)")
            if not keep_models and method != "base":
                shutil.rmtree(path)
        out["results"][fam] = results
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["cpu_seconds"] = round(time.process_time() - cpu, 1)
    (root / "study.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


# -- from JSON: aggregate, table, figures -------------------------------------------------------------------

def merge_margin(accuracy: float, seed_ci: float, base: float, n: int) -> float:
    """How far above the MLLM's accuracy a merge must be to count as helping: its seed interval plus 1.96
    standard errors of the difference of two accuracies on ``n`` test questions (the test set is a sample too)."""
    return seed_ci + 1.96 * math.sqrt((accuracy * (1 - accuracy) + base * (1 - base)) / n)


def aggregate(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95% CI over seeds of every (family, method): accuracy and CoT loss. A method not in
    :data:`SEEDED` ran once per configuration with the same result, so its interval is 0 (and it is checked).
    A merge helps a family when it beats the MLLM by more than :func:`merge_margin`."""
    methods = [m for m in configs[0]["results"]["close"]]
    table: dict[str, dict[str, Any]] = {}
    for fam in FAMILIES:
        table[fam] = {}
        for m in methods:
            accs = [c["results"][fam][m]["accuracy"] for c in configs if m in c["results"][fam]]
            losses = [c["results"][fam][m]["cot_loss"] for c in configs if m in c["results"][fam]]
            acc, ci = mean_ci(accs)
            loss, loss_ci = mean_ci(losses)
            table[fam][m] = {"accuracy": acc, "ci95": ci, "cot_loss": loss, "cot_loss_ci95": loss_ci, "n": len(accs),
                             "runs": accs, "seeded": m in SEEDED}
    pairs = configs[0]["pairs"]
    n = configs[0]["settings"]["n_test"]
    verdicts = {}
    for fam in FAMILIES:
        base = table[fam]["base"]["accuracy"]
        merges = {m: table[fam][m]["accuracy"] for m in MERGES if m in table[fam]}
        margins = {m: merge_margin(a, table[fam][m]["ci95"], base, n) for m, a in merges.items()}
        helped = [m for m, a in merges.items() if a - base > margins[m]]
        verdicts[fam] = {"diff_verdict": pairs[fam]["verdict"], "predicts_merging_helps": pairs[fam]["verdict"] != "far",
                         "merges_above_base": helped, "merging_helps": bool(helped), "margins": margins}
        verdicts[fam]["prediction_right"] = verdicts[fam]["predicts_merging_helps"] == verdicts[fam]["merging_helps"]
    return {"seeds": [c["seed"] for c in configs], "methods": methods, "table": table, "pairs": pairs,
            "verdicts": verdicts, "settings": configs[0]["settings"], "family": configs[0]["family"]}


def _pct(value: float, ci: float, n: int) -> str:
    return f"{100 * value:.1f}" + (f" ± {100 * ci:.1f}" if n > 1 and ci > 0 else "")


def markdown_table(agg: dict[str, Any]) -> str:
    """The paper's Tables 1-2 shape: rows methods, columns each family's accuracy (mean ± 95% CI, %) and CoT loss."""
    t, p = agg["table"], agg["pairs"]
    lines = ["| method | close: accuracy (%) | close: CoT loss | far: accuracy (%) | far: CoT loss |", "|---|---|---|---|---|",
             "| *diff verdict (median layer cosine / relative L2)* | " + " | ".join(
                 f"*{p[f]['verdict']}* ({p[f]['median_layer_cosine']:.3f} / {p[f]['median_layer_rel_l2']:.3f}) | "
                 for f in FAMILIES).rstrip(" |") + " |"]
    for m in agg["methods"]:
        cells = []
        for f in FAMILIES:
            r = t[f][m]
            cells += [_pct(r["accuracy"], r["ci95"], r["n"]), f"{r['cot_loss']:.3f}"]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pairs(agg: dict[str, Any], path: Path) -> Path:
    """The paper's Figure 2 in miniature: per-layer cosine and L2 of both (MLLM, reasoner) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for fam, marker in zip(FAMILIES, "os"):
        layers = agg["pairs"][fam]["layers"]
        xs = sorted(int(i) for i in layers)
        axes[0].plot(xs, [layers[str(i)]["cosine"] for i in xs], marker=marker, label=f"{fam} MLLM vs reasoner")
        axes[1].plot(xs, [layers[str(i)]["l2"] for i in xs], marker=marker, label=f"{fam} MLLM vs reasoner")
    axes[0].set(xlabel="layer", ylabel="cosine similarity", title="per-layer cosine")
    axes[1].set(xlabel="layer", ylabel="L2 distance", title="per-layer L2")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy(agg: dict[str, Any], path: Path) -> Path:
    """Accuracy per method and family, error bars the 95% confidence interval over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = agg["methods"]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.4
    for k, fam in enumerate(FAMILIES):
        rows = [agg["table"][fam][m] for m in methods]
        ax.bar([i + (k - 0.5) * width for i in range(len(methods))], [100 * r["accuracy"] for r in rows], width,
               yerr=[100 * r["ci95"] for r in rows], capsize=3, label=f"{fam} family")
    ax.set_xticks(range(len(methods)), [LABELS.get(m, m) for m in methods], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy, mean and 95% CI over seeds {agg['seeds']}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
