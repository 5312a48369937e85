"""FSDP2 on 2 gloo processes with a fused-expert MoE and a per-expert prior: the single-process weights.

FSDP2 shards each fused expert parameter ([E, 2I, H]) on its first dimension, so each process holds
whole experts; DriftBias must sum each expert's statistics over the processes exactly.
"""

import os

import pytest
import torch
import transformers

from deltakit.model import map_parameters
from deltakit.tiny import save_tiny
from deltakit.train import TrainConfig, finetune
from deltakit.train import loop as loop_module
from test_moe_finetune import text_examples
from train_helpers import DictPrior, collate, free_port, spawn

_ORIGINAL = (loop_module.load_data, loop_module.open_prior)


def _config(base, out, **kw) -> TrainConfig:
    kw = {"alpha": 1.0, **kw}
    return TrainConfig(model=str(base), data="synthetic.jsonl", out=str(out), prior="prior", rule="adaptive",
                       lr=1e-3, warmup_ratio=0.0, max_steps=2, adam_eps=1e-4, max_grad_norm=0.5, **kw)


def _patch(prior) -> None:
    loop_module.load_data = lambda config: (text_examples(8, 0), collate, None)
    loop_module.open_prior = lambda path: DictPrior(prior)


def _worker(rank, world, port, config, prior):
    torch.set_num_threads(1)
    _patch(prior)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    finetune(config)


def _weights(folder):
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_fsdp2_biases_each_expert_as_one_process_does(tmp_path):
    base = save_tiny("qwen3_vl_moe", tmp_path / "mllm", seed=0)
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    _, _, text = map_parameters(model)
    gen = torch.Generator().manual_seed(5)
    prior = {c: torch.randn(p.shape, generator=gen) * 0.05 for c, p in text.items()
             if ".mlp.experts." in c or ".self_attn." in c and c.endswith("_proj.weight")}
    assert sum(".mlp.experts." in c for c in prior) == 2 * 4 * 3  # 2 layers x 4 experts x gate, up, down
    spawn(_worker, 2, free_port(), _config(base, tmp_path / "fsdp", strategy="fsdp", batch_size=1, grad_accum=2), prior)
    _patch(prior)
    try:
        finetune(_config(base, tmp_path / "single", batch_size=2, grad_accum=2))
        finetune(_config(base, tmp_path / "sft", batch_size=2, grad_accum=2, alpha=0.0))
    finally:
        loop_module.load_data, loop_module.open_prior = _ORIGINAL
    single, fsdp, sft = _weights(tmp_path / "single"), _weights(tmp_path / "fsdp"), _weights(tmp_path / "sft")
    fused = [n for n in single if n.endswith("experts.gate_up_proj")]
    assert fused and all(not torch.equal(single[n], sft[n]) for n in fused)  # the prior moved every fused expert tensor
    for n in single:
        torch.testing.assert_close(fsdp[n], single[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
