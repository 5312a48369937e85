"""One DRIFT fine-tuning step on a tiny Qwen3-VL-MoE (fused experts) and a tiny Qwen3.5 (linear attention),
against a step written out here: HF's loss, clipping, the adaptive rule per expert, AdamW's first step."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from deltakit.tiny import SPECIAL, save_tiny
from deltakit.train import TrainConfig, finetune
from deltakit.train import loop as loop_module
from train_helpers import DictPrior, collate

TEXT = "model.language_model."


def text_examples(n: int, seed: int = 0) -> list[dict]:
    """Tokenised chat-like examples without images: a masked prompt and a trained answer."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(0, 400, (4,), generator=gen).tolist()
        answer = torch.randint(0, 400, (6,), generator=gen).tolist()
        head = [SPECIAL["im_start"], *prompt, SPECIAL["im_end"], SPECIAL["im_start"]]
        out.append({"input_ids": torch.tensor(head + answer + [SPECIAL["im_end"]]),
                    "labels": torch.tensor([-100] * len(head) + answer + [SPECIAL["im_end"]])})
    return out


def _model(folder):
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(folder, dtype=torch.float32)


def _prior(model, seed: int) -> tuple[dict, dict]:
    """Random D per canonical tensor of layer 0's MLP (each expert's gate, up, down, or the dense MLP) and of
    its attention (softmax or linear), and where each sits in memory: (param name, index or None, row slice)."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    tensors, where = {}, {}
    fused = TEXT + "layers.0.mlp.experts.gate_up_proj"
    if fused in params:
        experts, two_i, _ = params[fused].shape
        for j in range(experts):
            where[f"layers.0.mlp.experts.{j}.gate_proj.weight"] = (fused, j, slice(0, two_i // 2))
            where[f"layers.0.mlp.experts.{j}.up_proj.weight"] = (fused, j, slice(two_i // 2, two_i))
            where[f"layers.0.mlp.experts.{j}.down_proj.weight"] = (TEXT + "layers.0.mlp.experts.down_proj", j, slice(None))
    else:
        for m in ("gate", "up", "down"):
            where[f"layers.0.mlp.{m}_proj.weight"] = (TEXT + f"layers.0.mlp.{m}_proj.weight", None, slice(None))
    for n in params:
        if n.startswith(TEXT + "layers.0.") and (".self_attn." in n or ".linear_attn.in_proj" in n or ".linear_attn.out_proj" in n) \
                and n.endswith(("_proj.weight", "in_proj_qkv.weight", "in_proj_z.weight", "in_proj_a.weight", "in_proj_b.weight")):
            where[n[len(TEXT):]] = (n, None, slice(None))
    for c, (n, j, rows) in where.items():
        target = params[n][j][rows] if j is not None else params[n]
        tensors[c] = torch.randn(target.shape, generator=gen) * 0.05
    return tensors, where


def hand_rolled(folder, examples, prior, where, lr=1e-3, eps=1e-4, max_norm=0.5):
    model = _model(folder)
    trainable = {n: p for n, p in model.named_parameters() if not n.startswith(("model.visual.", "model.vision"))}
    model(**collate(examples)).loss.backward()
    total = math.sqrt(sum(float(p.grad.double().square().sum()) for p in trainable.values()))
    scale = min(1.0, max_norm / (total + 1e-6))
    grads = {n: p.grad.double() * scale for n, p in trainable.items()}
    for c, (n, j, rows) in where.items():  # each canonical tensor on its own: an expert's gate is one Linear weight
        g = grads[n][j][rows] if j is not None else grads[n]
        d = prior[c].double()
        cos = float((g * d).sum()) / (float(g.norm()) * float(d.norm()))
        g.sub_((1 + cos) / 2 * g.norm() * d / d.norm())  # in place: g is a view into grads[n]
    new = {}
    for n, p in model.named_parameters():
        if n not in trainable:
            new[n] = p.detach().clone()
            continue
        g = grads[n]
        m, v = 0.1 * g / (1 - 0.9), 0.001 * g * g / (1 - 0.999)
        new[n] = (p.detach().double() - lr * m / (v.sqrt() + eps)).float()
    return new


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5"])
def test_one_drift_step_matches_the_written_out_step(family, tmp_path, monkeypatch):
    base = save_tiny(family, tmp_path / "base", seed=0)
    prior, where = _prior(_model(base), seed=11)
    assert len(where) >= (12 if family == "qwen3_vl_moe" else 8)
    examples = text_examples(3)
    monkeypatch.setattr(loop_module, "load_data", lambda config: (examples, collate, None))
    monkeypatch.setattr(loop_module, "open_prior", lambda path: DictPrior(prior))
    config = TrainConfig(model=str(base), data="synthetic.jsonl", out=str(tmp_path / "out"), lr=1e-3, warmup_ratio=0.0,
                         max_steps=1, adam_eps=1e-4, precision="fp32", batch_size=3, max_grad_norm=0.5,
                         prior="prior", rule="adaptive", alpha=1.0)
    result = finetune(config)
    assert result.steps == 1 and result.drift_tensors == len(prior)
    got = {n: p.detach() for n, p in _model(tmp_path / "out").named_parameters()}
    want = hand_rolled(base, examples, prior, where)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=2e-7, msg=n)
