"""The built-in demo: the whole DRIFT pipeline on tiny models and synthetic data, offline, in seconds on a CPU.

:func:`run_demo` builds everything it needs and then runs every deltakit stage on it, in order:

1. **data**: :func:`deltakit.data.write_demo_data` draws synthetic visual questions with chain-of-thought
   answers (``train.jsonl``), a MathVista-style benchmark (``bench.jsonl``), as many held-out CoT
   conversations (``heldout/train.jsonl``, for a held-out loss) and a text-only copy of the training
   conversations (``train-text.jsonl``: the ``<image>`` placeholder and the images dropped).
2. **models**: a tiny Qwen2.5-VL MLLM (:func:`deltakit.tiny.save_tiny`, random weights) with the tiny
   offline processor, and a partner *reasoning* LLM: a copy of the MLLM fine-tuned on the text-only
   chain-of-thought data with :func:`deltakit.train.finetune`, whose text tower is saved as a plain Qwen2
   LLM (:func:`deltakit.tiny.save_partner_llm` with no noise). Like the paper's pairs, both descend from
   one model, and only the LLM has learned the reasoning format (its held-out text-only CoT loss, next
   to the base's, is in the report).
3. **diff** (:func:`deltakit.diagnostics.diff`), **merge** (linear, ``alpha`` on the MLLM, the BR2V
   baseline, :func:`deltakit.merge.merge`) and **prior** (:func:`deltakit.prior.export_prior`) of the pair.
4. **finetune**: plain SFT and DRIFT (same data, steps, seed and learning rate; DRIFT adds the prior).
5. **eval**: :func:`deltakit.evaluate.evaluate` of base, merged, SFT and DRIFT on the benchmark, plus
   each model's mean token loss on the held-out CoT conversations, and how each model moved from the
   base: ``cos(theta - theta_base, D)`` on the prior's tensors (1 for the linear merge by construction)
   and its distance to the reasoner relative to the base's.

Everything lands in one folder that appears only when complete (``demo.json`` is the summary; layout in
``docs/demo.md``). The tiny models learn little in a few dozen steps: the demo shows the mechanics and
the direction of each update, not the paper's accuracies.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakit.data import SFTDataset, collate, load_examples, pad_id, write_demo_data
from deltakit.demo_settings import MODELS, DemoSettings
from deltakit.diagnostics import diff
from deltakit.evaluate import evaluate
from deltakit.hf import load_processor, model_class
from deltakit.io.writer import atomic_output_dir, check_output_free
from deltakit.merge import MergeConfig, merge
from deltakit.model import open_model
from deltakit.prior import Prior, export_prior
from deltakit.progress import ProgressFn, no_progress
from deltakit.tiny import save_partner_llm, save_tiny
from deltakit.tiny_processor import save_tiny_processor
from deltakit.train import TrainConfig, finetune
from deltakit.train.loop import count_targets, token_loss_sum

log = logging.getLogger(__name__)


@dataclass
class ModelResult:
    """One compared model: where it is (relative to the demo folder), its scores, how it moved from the base."""

    path: str
    accuracy: float
    correct: int
    unanswered: int
    heldout_loss: float
    update_cos_prior: float | None
    update_norm: float
    reasoner_distance: float


@dataclass
class DemoReport:
    """What :func:`run_demo` did and found (``demo.json``; paths relative to ``out``)."""

    out: str
    settings: dict[str, Any]
    diff: dict[str, Any]
    merge: dict[str, Any]
    prior: dict[str, Any]
    finetune: dict[str, dict[str, Any]]
    models: dict[str, ModelResult]
    stages: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def text_only(src: Path, dst: Path) -> Path:
    """Copy a sharegpt JSONL without its images: ``<image>`` placeholders and the ``images`` list are dropped."""
    lines = []
    for line in src.read_text().splitlines():
        rec = json.loads(line)
        rec.pop("images", None)
        for msg in rec["messages"]:
            msg["content"] = msg["content"].replace("<image>", "")
        lines.append(json.dumps(rec) + "\n")
    dst.write_text("".join(lines))
    return dst


def heldout_loss(model_path: Path, data_path: Path, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy per assistant token of a chat JSONL (right-padded batches, float32, CPU)."""
    processor = load_processor(model_path, "to score the held-out answers")
    model = model_class(model_path).from_pretrained(model_path, dtype=torch.float32).eval()
    dataset = SFTDataset(load_examples(data_path), processor)
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))], pad_id(processor))
            total += float(token_loss_sum(model, batch))
            tokens += int(count_targets(batch))
    return total / max(tokens, 1)


def movement(base: Path, model: Path, reasoner: Path, prior: Prior) -> tuple[float | None, float, float]:
    """``cos(theta - theta_base, D)`` over the prior's tensors (None if nothing moved), ``|theta - theta_base|``,
    and ``|theta - theta_reasoner| / |theta_base - theta_reasoner|`` on the same tensors, all in float64."""
    mb, mm, mr = open_model(base), open_model(model), open_model(reasoner)
    dot = uu = dd = far = far0 = 0.0
    for name in prior.names:
        w0 = mb.get(name).double()
        u = mm.get(name).double() - w0
        d = prior.get(name).double()
        r = mr.get(name).double()
        dot += float((u * d).sum())
        uu += float(u.square().sum())
        dd += float(d.square().sum())
        far += float((w0 + u - r).square().sum())
        far0 += float((w0 - r).square().sum())
    for m in (mb, mm, mr):
        m.ckpt.close()
    cos = dot / (uu * dd) ** 0.5 if uu > 0 and dd > 0 else None
    return cos, uu ** 0.5, (far / far0) ** 0.5 if far0 > 0 else 0.0


def run_demo(out: str | os.PathLike, settings: DemoSettings = DemoSettings(), force: bool = False,
             progress: ProgressFn = no_progress) -> DemoReport:
    """Run the whole pipeline into ``out`` (see the module docstring); returns the summary also saved as ``demo.json``."""
    settings = settings.validated()
    out = check_output_free(out, force)
    started = time.perf_counter()
    stages: dict[str, float] = {}
    with atomic_output_dir(out, force) as root:
        def stage(name: str, step: int) -> None:
            stages[name] = time.perf_counter()
            log.info("demo [%d/7] %s", step, name)

        def done(name: str) -> None:
            stages[name] = time.perf_counter() - stages[name]

        s = settings
        stage("data", 1)
        data = write_demo_data(root / "data", n=s.n_train, n_bench=s.n_bench, seed=s.seed)
        heldout = write_demo_data(root / "data" / "heldout", n=s.n_bench, n_bench=0, seed=s.seed + 1).train
        text = text_only(data.train, root / "data" / "train-text.jsonl")
        done("data")

        def train(model: Path, data_path: Path, dest: Path, steps: int, **kw: Any) -> dict[str, Any]:
            config = TrainConfig(model=str(model), data=str(data_path), out=str(dest), run_dir=str(root / "runs" / dest.name),
                                 max_steps=steps, lr=s.lr, batch_size=s.batch_size, warmup_ratio=0.1, seed=s.seed, **kw)
            result = finetune(config, progress=progress)
            return {"steps": result.steps, "final_loss": result.final_loss, "losses": [h["loss"] for h in result.history],
                    "drift_tensors": result.drift_tensors, "drift_params": result.drift_params, "seconds": result.seconds}

        stage("models", 2)
        models = root / "models"
        base = save_tiny("qwen2_5_vl", models / "base", seed=s.seed, hidden=s.hidden, heads=4, kv_heads=2, intermediate=2 * s.hidden)
        save_tiny_processor(base)
        reasoner_vl = root / "work" / "reasoner-vl"
        reasoner_run = train(base, text, reasoner_vl, s.reasoner_steps)
        heldout_text = text_only(heldout, root / "data" / "heldout" / "train-text.jsonl")
        reasoner_run["heldout_text_loss"] = {"base": heldout_loss(base, heldout_text), "reasoner": heldout_loss(reasoner_vl, heldout_text)}
        llm = save_partner_llm(reasoner_vl, models / "reasoner-llm", noise=0.0, seed=s.seed)
        shutil.rmtree(root / "work")
        done("models")

        stage("diff", 3)
        report = diff(base, llm, progress=progress)
        (root / "reports").mkdir()
        (root / "reports" / "diff.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        diff_summary = {"verdict": report.verdict, "verdict_text": report.verdict_text,
                        "median_layer_cosine": report.median_layer_cosine, "median_layer_rel_l2": report.median_layer_rel_l2,
                        "overall_cosine": report.overall.cosine, "matched_tensors": len(report.tensors)}
        done("diff")

        stage("merge", 4)
        merged = merge(MergeConfig.simple(str(base), str(llm), "linear", s.merge_alpha), models / "merged", progress=progress)
        merge_summary = {"method": "linear", "alpha": s.merge_alpha, "merged_tensors": merged.merged, "copied_tensors": merged.copied}
        done("merge")

        stage("prior", 5)
        prior_path = root / "prior.safetensors"
        prior_report = export_prior(base, llm, prior_path, progress=progress)
        prior = Prior.open(prior_path)
        prior_summary = {"tensors": len(prior.names), "parameters": sum(math.prod(prior.shape(n)) for n in prior.names),
                         "dtype": prior_report.dtype, "bytes": prior_report.bytes_on_disk}
        done("prior")

        stage("finetune", 6)
        runs = {"reasoner": reasoner_run,
                "sft": train(base, data.train, models / "sft", s.steps),
                "drift": train(base, data.train, models / "drift", s.steps, prior=str(prior_path), rule=s.rule, alpha=s.drift_alpha)}
        done("finetune")

        stage("eval", 7)
        results: dict[str, ModelResult] = {}
        for name in MODELS:
            path = models / name
            ev = evaluate(path, data.bench, batch_size=s.n_bench, max_new_tokens=s.max_new_tokens, progress=progress)
            (root / "reports" / f"eval-{name}.json").write_text(json.dumps(ev.to_dict(), indent=2) + "\n")
            cos, norm, far = movement(base, path, llm, prior)
            results[name] = ModelResult(str(path.relative_to(root)), ev.accuracy, ev.correct, ev.unanswered,
                                        heldout_loss(path, heldout), cos, norm, far)
        prior.close()
        done("eval")

        demo = DemoReport(str(out), asdict(s), diff_summary, merge_summary, prior_summary, runs, results, stages,
                          time.perf_counter() - started)
        (root / "demo.json").write_text(json.dumps(demo.to_dict(), indent=2) + "\n")
    return demo
