"""DDP and FSDP2 on 2 gloo processes give the single-process weights for the same global batch, DRIFT on."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import transformers

from deltakit.tiny import save_tiny
from deltakit.train import TrainConfig, finetune
from deltakit.train import loop as loop_module
from train_helpers import DictPrior, collate, synthetic_examples

STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(base, out, **kw) -> TrainConfig:
    return TrainConfig(model=str(base), data="synthetic.jsonl", out=str(out), prior="prior", rule="adaptive", alpha=1.0,
                       lr=1e-3, warmup_ratio=0.0, max_steps=STEPS, adam_eps=1e-4, max_grad_norm=0.5, **kw)


def _patch(prior_tensors) -> None:
    loop_module.load_data = lambda config: (synthetic_examples(8, 0), collate, None)
    loop_module.open_prior = lambda path: DictPrior(prior_tensors)


def _worker(rank, world, runs, prior_tensors):
    torch.set_num_threads(1)
    _patch(prior_tensors)
    for port, config in runs:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        finetune(config)


def _weights(folder):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    base = save_tiny("qwen2_5_vl", tmp / "mllm", seed=0)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    prior = {n.removeprefix("model.language_model."): torch.randn(p.shape, generator=gen) * 0.05
             for n, p in model.named_parameters() if n.startswith("model.language_model.layers.") and "layernorm" not in n}
    distributed = [(_free_port(), _config(base, tmp / "ddp", strategy="ddp", batch_size=1, grad_accum=2)),
                   (_free_port(), _config(base, tmp / "fsdp", strategy="fsdp", batch_size=1, grad_accum=2, save_every=1))]
    mp.spawn(_worker, args=(2, distributed, prior), nprocs=2, join=True)
    _patch(prior)
    try:
        finetune(_config(base, tmp / "single", batch_size=2, grad_accum=2))
        # Resume the 2-process FSDP run's step-1 checkpoint in one process (DCP reshards it).
        finetune(_config(base, tmp / "resumed", batch_size=4, grad_accum=1, save_every=1, resume=True, run_dir=str(tmp / "fsdp.run")))
    finally:
        loop_module.load_data, loop_module.open_prior = _ORIGINAL
    return {name: _weights(tmp / name) for name in ("single", "ddp", "fsdp", "resumed")} | {"base": _weights(base), "prior": prior}


_ORIGINAL = (loop_module.load_data, loop_module.open_prior)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "resumed"])
def test_two_processes_match_one(runs, name):
    single, other = runs["single"], runs[name]
    moved = [n for n in single if not torch.equal(single[n], runs["base"][n])]
    assert len(moved) > 20
    for n in single:
        torch.testing.assert_close(other[n], single[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_prior_tensors_were_biased(runs):
    # Every prior-carrying tensor moved; the bias was applied to the sharded FSDP gradients too.
    for canonical in runs["prior"]:
        n = "model.language_model." + canonical
        assert not torch.equal(runs["fsdp"][n], runs["base"][n])
