"""The fine-tuning loop on a tiny Qwen2.5-VL: one step against a hand-rolled AdamW, alpha 0, resume, split invariance."""

import json
import math
import shutil

import pytest
import torch
import transformers
import yaml

from deltakit.errors import DeltakitError, IncompatibleError
from deltakit.tiny import save_tiny
from deltakit.tiny_processor import save_tiny_processor
from deltakit.train import ConfigError, TrainConfig, finetune
from deltakit.train import loop as loop_module
from deltakit.train.setup import Plan
from train_helpers import DictPrior, collate, synthetic_examples

PRIOR_KINDS = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.v_proj.weight", "mlp.down_proj.weight")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny("qwen2_5_vl", tmp_path_factory.mktemp("base") / "mllm", seed=0)


@pytest.fixture(scope="module")
def prior_tensors(base):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(11)
    return {f"layers.{i}.{k}": torch.randn(params[f"model.language_model.layers.{i}.{k}"].shape, generator=gen) * 0.05
            for i in range(2) for k in PRIOR_KINDS}


@pytest.fixture
def run(base, prior_tensors, tmp_path, monkeypatch):
    """finetune() on synthetic tokenised data; returns (result, {in-memory name: tensor} of the saved model)."""
    def _run(n_examples=4, data_seed=0, prior_dict=None, out="out", progress=None, **kw):
        examples = synthetic_examples(n_examples, data_seed)
        monkeypatch.setattr(loop_module, "load_data", lambda config: (examples, collate, None))
        monkeypatch.setattr(loop_module, "open_prior", lambda path: DictPrior(prior_dict if prior_dict is not None else prior_tensors))
        defaults = dict(model=str(base), data="synthetic.jsonl", out=str(tmp_path / out), lr=1e-3, warmup_ratio=0.0,
                        max_steps=1, adam_eps=1e-4, precision="fp32")
        config = TrainConfig(**{**defaults, **kw})
        result = finetune(config, progress=progress) if progress else finetune(config)
        return result, load_weights(tmp_path / out)
    return _run


def load_weights(folder):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


def hand_rolled_step(base, examples, lr, eps, max_norm, prior=None, alpha=1.0):
    """One step written out: HF's mean token loss, clip, adaptive DRIFT bias, AdamW's first step (bias-corrected)."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    trainable = {n: p for n, p in model.named_parameters() if not n.startswith("model.visual.")}
    batch = collate(examples)
    model(**batch).loss.backward()
    total = math.sqrt(sum(float(p.grad.double().square().sum()) for p in trainable.values()))
    scale = min(1.0, max_norm / (total + 1e-6))
    new = {}
    for n, p in model.named_parameters():
        if n not in trainable:
            new[n] = p.detach().clone()
            continue
        g = p.grad.double() * scale
        canonical = n.removeprefix("model.language_model.")
        if prior is not None and canonical in prior:
            d = prior[canonical].double()
            cos = float((g * d).sum()) / (float(g.norm()) * float(d.norm()))
            g = g - alpha * (1 + cos) / 2 * g.norm() * d / d.norm()
        m, v = 0.1 * g / (1 - 0.9), 0.001 * g * g / (1 - 0.999)
        new[n] = (p.detach().double() - lr * m / (v.sqrt() + eps)).float()
    return new


@pytest.mark.parametrize("with_prior", [False, True])
def test_one_step_matches_hand_rolled_adamw(run, base, prior_tensors, with_prior):
    kw = dict(prior="prior", rule="adaptive", alpha=1.0) if with_prior else {}
    result, got = run(n_examples=3, batch_size=3, max_grad_norm=0.5, **kw)
    want = hand_rolled_step(base, synthetic_examples(3, 0), 1e-3, 1e-4, 0.5, prior_tensors if with_prior else None)
    assert result.steps == 1 and result.drift_tensors == (8 if with_prior else 0)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=2e-7, msg=n)
    start = load_weights(base)
    assert all(torch.equal(got[n], start[n]) for n in got if n.startswith("model.visual."))
    assert sum(not torch.equal(got[n], start[n]) for n in got if n.startswith("model.language_model.")) > 10


def test_alpha_zero_is_plain_sft_bit_for_bit(run):
    _, sft = run(max_steps=3, batch_size=2, out="sft")
    _, zero = run(max_steps=3, batch_size=2, out="zero", prior="prior", alpha=0.0)
    assert all(torch.equal(sft[n], zero[n]) for n in sft)


def test_drift_moves_weights_toward_the_prior(run, base, prior_tensors):
    start = load_weights(base)
    _, sft = run(max_steps=3, batch_size=2, out="sft")
    _, drift = run(max_steps=3, batch_size=2, out="drift", prior="prior", rule="adaptive")

    def cosine(weights):
        names = [f"model.language_model.{c}" for c in prior_tensors]
        upd = torch.cat([(weights[n] - start[n]).flatten() for n in names])
        d = torch.cat([prior_tensors[c].flatten() for c in prior_tensors])
        return float(upd @ d / (upd.norm() * d.norm()))

    assert cosine(drift) > cosine(sft) + 0.1


def test_microbatch_split_does_not_change_the_step(run):
    _, one = run(n_examples=4, max_steps=2, batch_size=2, grad_accum=1, out="b2", prior="prior", rule="gradnorm")
    _, two = run(n_examples=4, max_steps=2, batch_size=1, grad_accum=2, out="a2", prior="prior", rule="gradnorm")
    for n in one:
        torch.testing.assert_close(one[n], two[n], rtol=1e-5, atol=1e-6)


def test_resume_gives_the_uninterrupted_weights(run, tmp_path):
    # 6 examples, global batch 2: 3 steps per epoch, so the resumed part crosses into epoch 2.
    args = dict(n_examples=6, max_steps=6, batch_size=2, prior="prior", save_every=2)
    _, full = run(out="full", **args)

    def crash_in_step_5(advance, total=None, description=None, info=""):
        crash_in_step_5.steps = getattr(crash_in_step_5, "steps", 0) + advance
        if crash_in_step_5.steps >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(out="again", progress=crash_in_step_5, **args)
    assert not (tmp_path / "again").exists()
    assert sorted(p.name for p in (tmp_path / "again.run" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    with pytest.raises(DeltakitError, match="--resume"):
        run(out="again", **args)
    with pytest.raises(ConfigError, match="lr is"):
        run(out="again", resume=True, **{**args, "lr": 2e-3})
    result, resumed = run(out="again", resume=True, **args)
    assert result.resumed_from == 4
    assert all(torch.equal(full[n], resumed[n]) for n in full)
    log = [json.loads(line) for line in (tmp_path / "again" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    run(out="again", force=True, **{**args, "max_steps": 3})
    assert [p.name for p in (tmp_path / "again.run" / "checkpoints").iterdir()] == ["step-0000002"]


def test_output_is_a_loadable_checkpoint_with_its_files(run, base, tmp_path):
    # The base carries the tiny processor: the output must too, loadable with transformers.
    with_processor = tmp_path / "base"
    shutil.copytree(base, with_processor)
    save_tiny_processor(with_processor)
    base_files = {p.name for p in with_processor.iterdir() if p.suffix != ".safetensors"}
    result, _ = run(max_steps=1, out="o", model=str(with_processor))
    out = tmp_path / "o"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "deltakit_finetune.json", "train_log.jsonl"} <= names
    assert base_files <= names and "tokenizer.json" in names
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.tokenizer("a b").input_ids == \
        transformers.AutoProcessor.from_pretrained(with_processor).tokenizer("a b").input_ids
    summary = json.loads((out / "deltakit_finetune.json").read_text())
    assert summary["config"]["lr"] == 1e-3 and summary["result"]["steps"] == 1
    assert transformers.AutoConfig.from_pretrained(out).model_type == "qwen2_5_vl"
    with pytest.raises(DeltakitError, match="already exists"):
        run(max_steps=1, out="o")


def test_gradient_checkpointing_bf16_autocast_and_progress(run, monkeypatch):
    infos, loaded = [], []
    load_model = loop_module.load_model
    monkeypatch.setattr(loop_module, "load_model", lambda config: loaded.append(load_model(config)) or loaded[-1])

    def record(advance, total=None, description=None, info=""):
        infos.append(info)

    plain, w = run(max_steps=2, batch_size=2, out="plain", prior="prior", progress=record)
    # Recomputing activations changes no number; each step's bar shows loss, lr and grad norm.
    _, ckpt = run(max_steps=2, batch_size=2, out="ckpt", prior="prior", gradient_checkpointing=True)
    assert [m.is_activation_checkpointing for m, _ in loaded] == [False, True]
    for n in w:
        torch.testing.assert_close(ckpt[n], w[n], rtol=1e-5, atol=1e-6)
    steps = [i for i in infos if i]
    assert len(steps) == 2
    for i, r in zip(steps, plain.history):
        assert f"loss {r['loss']:.4f}" in i and f"lr {r['lr']:.2e}" in i and f"|g| {r['grad_norm']:.3g}" in i
    # bf16 autocast (what "auto" picks on a bf16 GPU) really runs the forward in bf16: close, not equal.
    bf16, _ = run(max_steps=2, batch_size=2, out="bf16", prior="prior", precision="bf16")
    first, low = plain.history[0]["loss"], bf16.history[0]["loss"]
    assert low != first and abs(low - first) < 0.02 * first


def test_mismatched_prior_fails_before_training(run):
    with pytest.raises(IncompatibleError, match="matches no parameter"):
        run(prior="prior", prior_dict={"layers.9.mlp.up_proj.weight": torch.zeros(64, 32)}, out="bad")


def test_plan_schedule_and_batches():
    config = TrainConfig(model="m", data="d", out="o", epochs=2, batch_size=2, grad_accum=3, warmup_ratio=0.2)
    plan = Plan.make(25, config, world_size=2)
    assert (plan.global_batch, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (12, 2, 4, 1)
    assert [plan.lr_factor(s) for s in range(4)] == pytest.approx([1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))])
    with pytest.raises(DeltakitError, match="fewer than one global batch"):
        Plan.make(11, config, world_size=2)


def test_config_yaml_round_trip_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "data": "d", "out": "o", "rule": "gradnorm", "freeze": ["vision"], "adam_betas": [0.9, 0.95]}))
    config = TrainConfig.load(path, alpha=0.5, lr=None)
    assert (config.rule, config.alpha, config.lr, config.freeze, config.adam_betas) == ("gradnorm", 0.5, 1e-6, ("vision",), (0.9, 0.95))
    path.write_text("model: m\ndata: d\nout: o\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        TrainConfig.load(path)
    with pytest.raises(ConfigError, match="rule must be one of"):
        TrainConfig.load(None, model="m", data="d", out="o", rule="bogus")
    with pytest.raises(ConfigError, match="model is required"):
        TrainConfig.load(None, data="d", out="o")


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parent.parent.glob("commands/finetune-*.yaml")))
def test_shipped_configs_load(path):
    config = TrainConfig.load(path)
    assert config.lr == 1e-6 and config.epochs == 3 and config.warmup_ratio == 0.05 and config.freeze == ("vision", "projector")
    assert config.prior is None or (config.rule, config.alpha) == ("adaptive", 1.0)


def cli(argv, capsys):
    from deltakit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["finetune", *argv])
    return exc.value.code, capsys.readouterr().err


def test_cli_rejects_existing_output(base, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, err = cli(["--model", str(base), "--data", "x.jsonl", "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and err.startswith("error:") and "already exists" in err and len(err.strip().splitlines()) == 1


def test_cli_rejects_bad_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\nout: o\nwarmup: 3\n")
    code, err = cli(["--config", str(path)], capsys)
    assert code == 1 and "error:" in err and "unknown key 'warmup'" in err


def test_cli_end_to_end_on_real_data_and_prior(base, tmp_path, capsys):
    # The real path: processor + chat template on a sharegpt JSONL with images, a prior file from `deltakit prior`.
    from deltakit.cli import main
    from deltakit.demo.samples import write_demo_data
    from deltakit.prior import export_prior
    from deltakit.tiny import save_partner_llm

    model = tmp_path / "mllm"
    shutil.copytree(base, model)
    save_tiny_processor(model)
    llm = save_partner_llm(model, tmp_path / "llm", noise=0.3)
    export_prior(model, llm, tmp_path / "prior.safetensors")
    data = write_demo_data(tmp_path / "data", n=4, n_bench=1)
    main(["finetune", "--model", str(model), "--data", str(data.train), "--out", str(tmp_path / "out"), "--prior",
          str(tmp_path / "prior.safetensors"), "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--json", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["steps"] == 2 and result["drift_tensors"] == 20
    assert result["drift_params"] == sum(t.numel() for n, t in load_weights(model).items()
                                         if n.startswith("model.language_model.layers.") and "layernorm" not in n)
    assert "20 tensors" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all({"loss", "lr", "grad_norm", "drift_cos"} <= set(r) for r in log)
    assert all(r["tokens"] > 0 for r in log)
