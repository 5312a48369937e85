"""DriftCallback in transformers' Trainer: alpha 0 is the plain run bit for bit, the bias aligns the update
with D, a prior of another family stops the run before its first step, and one step equals deltakit finetune."""

from __future__ import annotations

import pytest
import torch
import transformers

from deltakit.errors import IncompatibleError
from deltakit.integrations import DriftCallback
from deltakit.tiny import save_tiny
from deltakit.train import TrainConfig, finetune
from deltakit.train import loop as loop_module
from test_moe_finetune import text_examples
from train_helpers import DictPrior, collate, free_port, spawn, synthetic_examples

TEXT = "model.language_model."


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return tiny_checkpoint("qwen2_5_vl")  # the session's tiny Qwen2.5-VL (seed 0, float32), read-only


@pytest.fixture(scope="module")
def prior(base):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    return {n.removeprefix(TEXT): torch.randn(p.shape, generator=gen) * 0.05
            for n, p in model.named_parameters() if n.startswith(TEXT + "layers.") and "layernorm" not in n}


class Examples(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def train(base, out, callbacks=(), steps=3, batch=2, accum=2, max_norm=0.5, lr=1e-3, n=8, examples=None, **extra):
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    for name, p in model.named_parameters():  # vision tower and projector frozen, as deltakit finetune does
        p.requires_grad_(not name.startswith("model.visual."))
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=steps,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=max_norm, adam_epsilon=1e-4,
        weight_decay=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        remove_unused_columns=False, dataloader_drop_last=True, disable_tqdm=True, train_sampling_strategy="sequential", **extra)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Examples(examples or synthetic_examples(n, 0)),
                                   data_collator=collate, callbacks=list(callbacks))
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


def test_alpha_zero_is_the_plain_run_bit_for_bit(base, prior, tmp_path):
    plain, _ = train(base, tmp_path / "plain")
    zero, trainer = train(base, tmp_path / "zero", [DriftCallback(DictPrior(prior), alpha=0.0)])
    assert all(torch.equal(plain[n], zero[n]) for n in plain)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all("drift_cos" in h and h["drift_ratio"] == 0.0 for h in logged)


def test_drift_aligns_the_update_with_the_prior(base, prior, tmp_path):
    start = {n: p.detach() for n, p in transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        base, dtype=torch.float32).named_parameters()}
    plain, _ = train(base, tmp_path / "plain")
    callback = DriftCallback(DictPrior(prior), rule="adaptive", alpha=1.0)
    drift, trainer = train(base, tmp_path / "drift", [callback])

    def cosine(weights):
        upd = torch.cat([(weights[TEXT + c] - start[TEXT + c]).flatten() for c in prior])
        d = torch.cat([prior[c].flatten() for c in prior])
        return float(upd @ d / (upd.norm() * d.norm()))

    assert cosine(drift) > cosine(plain) + 0.1
    assert callback.bias.num_tensors == len(prior) and len(callback.history) == 3
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(0 < h["drift_ratio"] and -1 <= h["drift_cos"] <= 1 for h in logged)


def test_a_prior_of_another_family_stops_before_the_first_step(base, prior, tmp_path):
    other = DictPrior(prior)
    other.family = "llava"
    callback = DriftCallback(other)
    with pytest.raises(IncompatibleError, match="built for a llava model but this model is qwen2_5_vl"):
        train(base, tmp_path / "x", [callback])
    assert callback.bias is None


def test_one_step_equals_deltakit_finetune(base, prior, tmp_path, monkeypatch):
    """One optimizer step on one batch of 4: the same mean token loss, clipping, adaptive bias and AdamW step
    (finetune's schedule at step 0 is the base lr, as Trainer's constant one)."""
    examples = synthetic_examples(4, 0)
    got, _ = train(base, tmp_path / "trainer", [DriftCallback(DictPrior(prior))], steps=1, batch=4, accum=1, n=4)
    monkeypatch.setattr(loop_module, "load_data", lambda config: (examples, collate, None))
    monkeypatch.setattr(loop_module, "open_prior", lambda path: DictPrior(prior))
    finetune(TrainConfig(model=str(base), data="synthetic.jsonl", out=str(tmp_path / "ft"), lr=1e-3, warmup_ratio=0.0,
                         max_steps=1, adam_eps=1e-4, precision="fp32", batch_size=4, max_grad_norm=0.5, prior="prior",
                         rule="adaptive", alpha=1.0))
    want = {n: p.detach() for n, p in transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "ft", dtype=torch.float32).named_parameters()}
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=2e-7, msg=n)


def _spawned(rank, world, port, base, out, fsdp, prior):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    kw = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}} if fsdp else {}
    _, trainer = train(base, out, [DriftCallback(DictPrior(prior))], steps=2, batch=1, accum=2, examples=text_examples(8),
                       ddp_backend="gloo", **kw)
    trainer.save_model(out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_under_accelerate_match_one(base, prior, tmp_path, strategy):
    """2 gloo processes x 1 example x 2 accumulation steps = the one-process global batch of 4 (2 x 2).

    The examples have equal lengths and label counts: Qwen2.5-VL does not take ``num_items_in_batch``
    (``accepts_loss_kwargs`` is False), so transformers averages per-micro-batch token means, which weights
    examples by micro-batch size; with equal counts every split gives the global token mean and the runs must agree."""
    port = free_port()
    spawn(_spawned, 2, port, base, str(tmp_path / strategy), strategy == "fsdp2", prior)
    single, _ = train(base, tmp_path / "single", [DriftCallback(DictPrior(prior))], steps=2, batch=2, accum=2,
                      examples=text_examples(8))
    plain, _ = train(base, tmp_path / "plain", steps=2, batch=2, accum=2, examples=text_examples(8))
    got = {n: p.detach() for n, p in transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / strategy, dtype=torch.float32).named_parameters()}
    for n in single:
        torch.testing.assert_close(got[n], single[n], rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.equal(single[TEXT + c], plain[TEXT + c]) for c in prior)  # the bias acted


def test_trl_sft_trainer(tmp_path):
    """TRL's SFTTrainer (a Trainer subclass) on a tiny Qwen2 LLM: alpha 0 is the plain run bit for bit, alpha 1
    aligns the update with D more than plain SFT does."""
    import datasets
    import trl

    base = save_tiny("qwen2", tmp_path / "llm", seed=0)
    gen = torch.Generator().manual_seed(3)
    data = datasets.Dataset.from_dict({"input_ids": [torch.randint(0, 400, (12,), generator=gen).tolist() for _ in range(8)]})
    start = {n: p.detach().clone() for n, p in transformers.AutoModelForCausalLM.from_pretrained(base).named_parameters()}
    prior = {n.removeprefix("model."): torch.randn(p.shape, generator=gen) * 0.05 for n, p in start.items()
             if ".layers." in n and "norm" not in n}

    def run(callbacks, out):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        args = trl.SFTConfig(output_dir=str(tmp_path / out), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=0.5,
                             report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                             train_sampling_strategy="sequential", disable_tqdm=True)
        trl.SFTTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
        return {n: p.detach() for n, p in model.named_parameters()}

    def cosine(weights):
        upd = torch.cat([(weights["model." + c] - start["model." + c]).flatten() for c in prior])
        d = torch.cat([prior[c].flatten() for c in prior])
        return float(upd @ d / (upd.norm() * d.norm()))

    plain = run([], "plain")
    zero = run([DriftCallback(DictPrior(prior), alpha=0.0)], "zero")
    assert all(torch.equal(plain[n], zero[n]) for n in plain)
    assert cosine(run([DriftCallback(DictPrior(prior))], "drift")) > cosine(plain) + 0.1
