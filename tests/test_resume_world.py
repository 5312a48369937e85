"""A checkpoint written by 1 process resumes on 2 (and one of 2 on 1, in test_distributed.py): the final weights
are the uninterrupted run's. The tiny model has no dropout, so the re-seeded RNG streams change nothing."""

import os
import shutil

import torch
import transformers

from deltakit.tiny import save_tiny
from deltakit.train import TrainConfig, finetune
from deltakit.train import loop as loop_module
from train_helpers import DictPrior, collate, free_port, spawn, synthetic_examples

_ORIGINAL = (loop_module.load_data, loop_module.open_prior)


def _config(base, out, run_dir, **kw) -> TrainConfig:
    return TrainConfig(model=str(base), data="synthetic.jsonl", out=str(out), run_dir=str(run_dir), prior="prior",
                       rule="adaptive", lr=1e-3, warmup_ratio=0.0, max_steps=3, adam_eps=1e-4, max_grad_norm=0.5,
                       save_every=1, **kw)


def _patch(prior) -> None:
    loop_module.load_data = lambda config: (synthetic_examples(12, 0), collate, None)
    loop_module.open_prior = lambda path: DictPrior(prior)


def _resume_on_two(rank, world, port, config, prior):
    torch.set_num_threads(1)
    _patch(prior)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    finetune(config)


def _weights(folder):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_one_process_checkpoint_resumes_on_two(tmp_path):
    base = save_tiny("qwen2_5_vl", tmp_path / "mllm", seed=0)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    prior = {n.removeprefix("model.language_model."): torch.randn(p.shape, generator=gen) * 0.05
             for n, p in model.named_parameters() if n.startswith("model.language_model.layers.") and "layernorm" not in n}
    _patch(prior)
    try:
        # the uninterrupted run; its step-1 checkpoint is where the 2-process run takes over
        finetune(_config(base, tmp_path / "whole", tmp_path / "cut.run", batch_size=2, grad_accum=2, keep_checkpoints=3))
    finally:
        loop_module.load_data, loop_module.open_prior = _ORIGINAL
    for later in (tmp_path / "cut.run" / "checkpoints").glob("step-*"):  # as if the run had stopped after step 1 of 3
        if later.name != "step-0000001":
            shutil.rmtree(later)
    assert [p.name for p in (tmp_path / "cut.run" / "checkpoints").iterdir()] == ["step-0000001"]
    assert len(list((tmp_path / "cut.run" / "checkpoints" / "step-0000001").glob("rng-*.pt"))) == 1
    port = free_port()
    resumed = _config(base, tmp_path / "resumed", tmp_path / "cut.run", batch_size=1, grad_accum=2, resume=True)
    spawn(_resume_on_two, 2, port, resumed, prior)
    whole, got = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    for n in whole:
        torch.testing.assert_close(got[n], whole[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
