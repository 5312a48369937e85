"""DRIFT on PEFT LoRA adapters: the projected directions against autograd, one bias step written out, frozen prior
targets without an adapter, and deltakit finetune with LoRA (alpha 0 = plain LoRA bit for bit, DRIFT aligns s B A
with D, resume, the saved adapter and the merged model)."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*deprecated:FutureWarning")
from safetensors.torch import load_file  # noqa: E402

from deltakit.drift import DriftBias  # noqa: E402
from deltakit.errors import IncompatibleError  # noqa: E402
from deltakit.lora import lora_directions  # noqa: E402
from deltakit.tiny import build_tiny, save_tiny  # noqa: E402
from deltakit.train import ConfigError, TrainConfig, finetune  # noqa: E402
from deltakit.train import loop as loop_module  # noqa: E402
from train_helpers import DictPrior, collate, free_port, synthetic_examples  # noqa: E402

LM = "model.language_model."
PEFT_LM = "base_model.model." + LM
KINDS = ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, LORA_ALPHA = 4, 8.0  # scaling s = 2
RUN = dict(lr=1e-3, warmup_ratio=0.0, max_steps=4, batch_size=2, adam_eps=1e-4, precision="fp32", lora_rank=RANK)


def lora_model(targets: list[str], seed: int = 0, **kw) -> peft.PeftModel:
    """A tiny Qwen2.5-VL wrapped with PEFT by hand (as a Trainer user would), LoRA on ``targets`` (module paths)."""
    model = build_tiny("qwen2_5_vl", seed)
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(model, peft.LoraConfig(target_modules=targets, **{"r": RANK, "lora_alpha": LORA_ALPHA, **kw}))


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ projected directions
@pytest.mark.parametrize("transposed", [False, True])
def test_projected_directions_are_the_gradients_of_the_inner_product(transposed):
    # d<W + s B A, D>/dA and /dB by autograd (delta s (B A)^T when the layer stores W transposed).
    a, b = randn((3, 5), 1).requires_grad_(), randn((6, 3), 2).requires_grad_()
    s = 1.7
    d = randn((5, 6) if transposed else (6, 5), 3)
    delta = s * (b @ a)
    ((randn(d.shape, 4) + (delta.T if transposed else delta)) * d).sum().backward()
    da, db = lora_directions(d, a, b, s, transposed)
    torch.testing.assert_close(da, a.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(db, b.grad, rtol=1e-6, atol=1e-6)


def test_bound_directions_match_autograd_through_peft_layers():
    # PEFT's own delta (get_delta_weight): a Linear layer with rsLoRA scaling and an Embedding layer (delta (B A)^T).
    q, embed = LM + "layers.0.self_attn.q_proj", LM + "embed_tokens"
    model = lora_model([q, embed], use_rslora=True, init_lora_weights=False)
    prior = {"layers.0.self_attn.q_proj.weight": randn((32, 32), 5), "embed_tokens.weight": randn((512, 32), 6)}
    bias = DriftBias.bind(model, DictPrior(prior))
    assert {t.name for t in bias.lora_targets} == set(prior) and not bias.targets
    for t in bias.lora_targets:
        layer = model.base_model.model.get_submodule(t.module)
        assert t.scaling == pytest.approx(LORA_ALPHA / math.sqrt(RANK)) and t.transposed == (t.module == embed)
        (layer.get_delta_weight("default") * prior[t.name]).sum().backward()
        da, db = t.directions(t.prior)
        torch.testing.assert_close(da, t.a.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(db, t.b.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- one bias step
def adaptive(g: torch.Tensor, d: torch.Tensor, a: float) -> torch.Tensor:
    """g - a (1 + cos) / 2 |g| D^ in float64; g unchanged where D = 0."""
    g, d = g.double(), d.double()
    if float(d.norm()) == 0:
        return g
    cos = float((g * d).sum() / (g.norm() * d.norm()))
    return g - a * (1 + cos) / 2 * g.norm() * d / d.norm()


@pytest.mark.parametrize("b_zero", [False, True])
def test_one_bias_step_on_lora_factors_written_out(b_zero):
    # Two LoRA-wrapped weights (one with a per-module alpha 0.5) and an unfrozen full parameter (the final norm).
    q, down = "layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"
    model = lora_model([LM + q, LM + down], init_lora_weights=b_zero)  # True: PEFT's default, B = 0; False: B random too
    norm = model.base_model.model.model.language_model.norm.weight.requires_grad_(True)
    prior = {f"{q}.weight": randn((32, 32), 7) * 0.1, f"{down}.weight": randn((32, 64), 8), "norm.weight": randn((32,), 9)}
    alpha, module_alpha = 0.8, {f"{down}.weight": 0.5}
    bias = DriftBias.bind(model, DictPrior(prior, module_alpha), rule="adaptive", alpha=alpha)
    assert bias.num_tensors == 3 and [t.name for t in bias.targets] == [LM + "norm.weight"]
    model(**collate(synthetic_examples(3, 0))).loss.backward()
    before = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    assert len(before) == 5  # A and B of both adapters, the norm; every base weight frozen
    step = bias.apply()

    cosines = []
    for name in (q, down):
        layer = model.base_model.model.get_submodule(LM + name)
        a_, b_ = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s, d = layer.scaling["default"], prior[f"{name}.weight"].double()
        a = alpha * module_alpha.get(f"{name}.weight", 1.0)
        d_a, d_b = s * b_.detach().double().T @ d, s * d @ a_.detach().double().T  # the chain rule, written out
        for factor, d_factor in ((a_, d_a), (b_, d_b)):
            g = before[factor]
            torch.testing.assert_close(factor.grad.double(), adaptive(g, d_factor, a), rtol=1e-5, atol=1e-8)
            if float(d_factor.norm()):
                cosines.append(float((g.double() * d_factor).sum() / (g.double().norm() * d_factor.norm())))
        if b_zero:  # B = 0: D_A = 0, so A's gradient (0 as well) is left alone; B is pulled along s D A^T
            assert not b_.detach().any() and torch.equal(a_.grad, before[a_])
    g_norm = before[norm]
    torch.testing.assert_close(norm.grad.double(), adaptive(g_norm, prior["norm.weight"], alpha), rtol=1e-5, atol=1e-8)
    cosines.append(float((g_norm.double() * prior["norm.weight"].double()).sum() / (g_norm.norm() * prior["norm.weight"].norm())))
    assert len(cosines) == (3 if b_zero else 5) and step.cos == pytest.approx(sum(cosines) / len(cosines), rel=1e-5)


# ------------------------------------------------------------------------------- frozen targets, FSDP2, callback
def test_frozen_prior_tensors_without_adapter_fail_or_are_skipped(caplog):
    model = lora_model([LM + "layers.0.self_attn.q_proj"])
    prior = {"layers.0.self_attn.q_proj.weight": randn((32, 32), 1), "layers.0.self_attn.q_proj.bias": randn((32,), 2),
             "layers.1.self_attn.q_proj.weight": randn((32, 32), 3), "layers.1.input_layernorm.weight": randn((32,), 4)}
    with pytest.raises(IncompatibleError, match="3 prior tensors target frozen parameters with no LoRA adapter.*skip_frozen"):
        DriftBias.bind(model, DictPrior(prior))
    with caplog.at_level(logging.INFO, logger="deltakit.drift"):
        bias = DriftBias.bind(model, DictPrior(prior), skip_frozen=True)
    assert (bias.num_tensors, bias.num_skipped, bias.num_params) == (1, 3, 2 * 32 * RANK)
    assert sorted(bias.skipped) == sorted(set(prior) - {"layers.0.self_attn.q_proj.weight"})
    assert "1 prior tensors act, 3 skipped" in caplog.text
    with pytest.raises(IncompatibleError, match="nothing to bias"):
        DriftBias.bind(model, DictPrior({"layers.0.self_attn.q_proj.bias": prior["layers.0.self_attn.q_proj.bias"]}), skip_frozen=True)
    # Full fine-tuning, same rule: a frozen weight is counted in the error, or skipped.
    plain = build_tiny("qwen2_5_vl")
    plain.model.language_model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    full = DictPrior({"layers.0.mlp.up_proj.weight": randn((64, 32), 5), "layers.0.mlp.down_proj.weight": randn((32, 64), 6)})
    with pytest.raises(IncompatibleError, match="1 prior tensor targets a frozen parameter with no LoRA adapter"):
        DriftBias.bind(plain, full)
    assert DriftBias.bind(plain, full, skip_frozen=True).skipped == ["layers.0.mlp.up_proj.weight"]
    # DriftCallback passes skip_frozen through to bind (on a PeftModel, as a Trainer holds it).
    from deltakit.integrations import DriftCallback

    callback = DriftCallback(DictPrior(prior), skip_frozen=True)
    callback.on_train_begin(SimpleNamespace(deepspeed=None), None, None, model=model)
    assert callback.bias.num_skipped == 3 and len(callback.bias.lora_targets) == 1


def test_lora_factors_sharded_by_fsdp2_are_refused():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    port = free_port()
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model = lora_model([LM + "layers.0.self_attn.q_proj"])
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(IncompatibleError, match="FSDP2.*not supported yet"):
            DriftBias.bind(model, DictPrior({"layers.0.self_attn.q_proj.weight": randn((32, 32), 1)}))
    finally:
        dist.destroy_process_group()


def test_lora_config_errors():
    need = dict(model="m", data="d", out="o")
    assert TrainConfig.load(None, **need, lora_rank=8, lora_targets="attn,mlp.down").lora_targets == ("attn", "mlp.down")
    assert TrainConfig.load(None, **need, lora_rank=8).resolved_lora_alpha == 16.0
    for bad, match in [(dict(merge_lora=True), "merge_lora needs lora_rank > 0"), (dict(lora_rank=-1), "lora_rank must be"),
                       (dict(lora_rank=4, lora_targets="attn,bogus"), "unknown module 'bogus'"),
                       (dict(lora_rank=4, freeze="vision"), "every base weight is frozen"),
                       (dict(lora_rank=4, strategy="fsdp"), "LoRA under FSDP2 is not supported yet")]:
        with pytest.raises(ConfigError, match=match):
            TrainConfig.load(None, **need, **bad)


# ------------------------------------------------------------------------------------- deltakit finetune with LoRA
@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return tiny_checkpoint("qwen2_5_vl")  # the session's tiny Qwen2.5-VL (seed 0, float32), read-only


@pytest.fixture(scope="module")
def prior(base):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(11)
    return {f"layers.{i}.{k}": torch.randn(shapes[f"{LM}layers.{i}.{k}"], generator=gen) * 0.05 for i in range(2) for k in KINDS}


def patch(mp, prior_dict):
    examples = synthetic_examples(8, 0)
    mp.setattr(loop_module, "load_data", lambda config: (examples, collate, None))
    mp.setattr(loop_module, "open_prior", lambda path: DictPrior(prior_dict))


@pytest.fixture(scope="module")
def runs(base, prior, tmp_path_factory):
    """Plain LoRA, DRIFT-LoRA at alpha 0 (finetune API), DRIFT-LoRA at alpha 1 with --merge-lora (the CLI): 4 steps each."""
    from deltakit.cli import main

    tmp = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        patch(mp, prior)
        results = {"plain": finetune(TrainConfig(model=str(base), data="x.jsonl", out=str(tmp / "plain"), **RUN)),
                   "zero": finetune(TrainConfig(model=str(base), data="x.jsonl", out=str(tmp / "zero"), prior="p", alpha=0.0, **RUN))}
        main(["finetune", "--model", str(base), "--data", "x.jsonl", "--out", str(tmp / "drift"), "--prior", "p", "--alpha", "1",
              "--lora-rank", str(RANK), "--lora-alpha", str(LORA_ALPHA), "--lora-targets", "attn,mlp", "--merge-lora",
              "--lr", "1e-3", "--warmup-ratio", "0", "--max-steps", "4", "--batch-size", "2", "--adam-eps", "1e-4",
              "--precision", "fp32", "--json", str(tmp / "drift.json")])
    results["drift"] = json.loads((tmp / "drift.json").read_text())
    return tmp, results


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def updates(weights: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """s B A of each prior target, from an adapter's tensors."""
    out = {}
    for c in names:
        key = PEFT_LM + c.removesuffix(".weight")
        out[c] = LORA_ALPHA / RANK * weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]
    return out


def test_alpha_zero_is_plain_lora_bit_for_bit(runs):
    tmp, results = runs
    plain, zero = adapter(tmp / "plain"), adapter(tmp / "zero")
    assert plain.keys() == zero.keys() and len(plain) == 2 * 2 * len(ADAPTED)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert all(plain[k].any() for k in plain if "lora_B" in k)  # B left its zero init: the adapters trained
    assert (results["zero"].drift_tensors, results["plain"].drift_tensors) == (8, 0)


def test_drift_moves_the_lora_update_toward_the_prior(runs, prior):
    tmp, _ = runs
    plain, drift = updates(adapter(tmp / "plain"), prior), updates(adapter(tmp / "drift"), prior)

    def cos(u, d):
        return float(u.flatten() @ d.flatten() / (u.norm() * d.norm()))

    pooled = {k: cos(torch.cat([w[c].flatten() for c in prior]), torch.cat([prior[c].flatten() for c in prior])) for k, w in
              (("plain", plain), ("drift", drift))}
    assert pooled["drift"] > pooled["plain"] + 0.1, pooled
    for c in prior:
        assert cos(drift[c], prior[c]) > cos(plain[c], prior[c]) + 0.05, c


def test_outputs_load_with_peft_and_the_merged_model_is_w_plus_sba(runs, base, prior):
    tmp, results = runs
    out = tmp / "drift"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (RANK, LORA_ALPHA, "LORA")
    assert len(config["target_modules"]) == 2 * len(ADAPTED) and not any("visual" in m for m in config["target_modules"])
    drift = results["drift"]
    assert (drift["drift_tensors"], drift["lora_modules"], drift["drift_skipped"]) == (8, 14, 0)
    assert drift["drift_params"] == sum(RANK * sum(p.shape) for p in prior.values())
    assert {"deltakit_finetune.json", "train_log.jsonl"} <= {p.name for p in out.iterdir()}
    cls = transformers.Qwen2_5_VLForConditionalGeneration
    start = {n: p.detach() for n, p in cls.from_pretrained(base, dtype=torch.float32).named_parameters()}
    trained = adapter(out)
    loaded = peft.PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32), out).eval()
    got = {n.replace(".default.", "."): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in trained)
    merged = cls.from_pretrained(out / "merged", dtype=torch.float32).eval()
    weights = {n: p.detach() for n, p in merged.named_parameters()}
    assert weights.keys() == start.keys()
    for module in config["target_modules"]:
        key = "base_model.model." + module
        want = start[f"{module}.weight"] + LORA_ALPHA / RANK * trained[f"{key}.lora_B.weight"] @ trained[f"{key}.lora_A.weight"]
        torch.testing.assert_close(weights[f"{module}.weight"], want, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(weights[n], start[n]) for n in start if not any(n == f"{m}.weight" for m in config["target_modules"]))
    batch = collate(synthetic_examples(2, 5))
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, loaded(**batch).logits, rtol=1e-4, atol=1e-5)


def test_lora_run_resumes_to_the_uninterrupted_adapter(runs, base, prior, tmp_path, monkeypatch):
    # The checkpoint holds the trainable parameters (the factors) and AdamW's state; the frozen base is reloaded.
    tmp, _ = runs
    patch(monkeypatch, prior)
    config = dict(model=str(base), data="x.jsonl", out=str(tmp_path / "again"), prior="p", save_every=2, **RUN)

    def crash_in_step_3(advance, total=None, description=None, info=""):
        crash_in_step_3.steps = getattr(crash_in_step_3, "steps", 0) + advance
        if crash_in_step_3.steps >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(TrainConfig(**config), progress=crash_in_step_3)
    assert [p.name for p in (tmp_path / "again.run" / "checkpoints").iterdir()] == ["step-0000002"]
    with pytest.raises(ConfigError, match="lora_rank is 8"):
        finetune(TrainConfig(**{**config, "resume": True, "lora_rank": 8}))
    result = finetune(TrainConfig(**config, resume=True))
    assert result.resumed_from == 2
    want, got = adapter(tmp / "drift"), adapter(tmp_path / "again")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_finetune_with_lora_refuses_frozen_prior_tensors_unless_skipped(base, prior, tmp_path, monkeypatch):
    with_bias = {**prior, "layers.0.self_attn.q_proj.bias": torch.full((32,), 0.1)}
    patch(monkeypatch, with_bias)
    args = dict(model=str(base), data="x.jsonl", prior="p", **{**RUN, "max_steps": 1})
    with pytest.raises(IncompatibleError, match="1 prior tensor targets a frozen parameter.*--skip-frozen"):
        finetune(TrainConfig(out=str(tmp_path / "refused"), **args))
    assert not (tmp_path / "refused").exists()
    result = finetune(TrainConfig(out=str(tmp_path / "skipped"), skip_frozen=True, **args))
    assert (result.drift_tensors, result.drift_skipped) == (8, 1)
