"""DRIFT rules against hand-written formulas, and binding a prior to in-memory parameters of each family."""

import math

import pytest
import torch
import transformers

from deltakit.drift import DriftBias, drift_gradient
from deltakit.errors import DeltakitError, IncompatibleError
from deltakit.tiny import build_tiny

from train_helpers import DictPrior


def reference(g: torch.Tensor, d: torch.Tensor, a: float, rule: str) -> torch.Tensor:
    """The paper's rules written out in float64 with numpy-style explicit sums."""
    g64, d64 = g.double(), d.double()
    gn = math.sqrt(float((g64 * g64).sum()))
    dn = math.sqrt(float((d64 * d64).sum()))
    if rule == "absolute":
        return g64 - a * d64
    if rule == "gradnorm":
        return g64 - a * gn * d64 / dn
    cos = float((g64 * d64).sum()) / (gn * dn)
    return g64 - a * (1 + cos) / 2 * gn * d64 / dn


@pytest.mark.parametrize("rule", ["absolute", "gradnorm", "adaptive"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_rules_match_formula(rule, alpha):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(7, 5, generator=gen)
    d = torch.randn(7, 5, generator=gen) * 4
    out = drift_gradient(g, d, alpha, rule)
    torch.testing.assert_close(out.double(), reference(g, d, alpha, rule), rtol=1e-6, atol=1e-6)


def test_adaptive_limits():
    # g parallel to D: cos = 1, full pull a|g| D^; g anti-parallel: cos = -1, no pull.
    d = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(drift_gradient(2 * d, d, 1.0, "adaptive"), 2 * d - 10 * d / 5)
    torch.testing.assert_close(drift_gradient(-2 * d, d, 1.0, "adaptive"), -2 * d)


def test_bf16_prior_on_float32_gradient():
    gen = torch.Generator().manual_seed(4)
    g, d = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen).bfloat16()
    out = drift_gradient(g, d, 1.0, "gradnorm")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(g, d.float(), 1.0, "gradnorm"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["gradnorm", "adaptive"])
def test_zero_gradient_or_prior_adds_nothing(rule):
    d = torch.randn(4, 4)
    assert torch.equal(drift_gradient(torch.zeros(4, 4), d, 1.0, rule), torch.zeros(4, 4))
    g = torch.randn(4, 4)
    assert torch.equal(drift_gradient(g, torch.zeros(4, 4), 1.0, rule), g)
    assert torch.equal(drift_gradient(g, torch.zeros(4, 4), 1.0, "absolute"), g)


# Shard sums: DriftBias._sum_over_shards and apply on FSDP2 shards of 2 gloo processes, checked against
# reference() on whole tensors, run in the 2-process spawn of tests/test_distributed.py
# (test_shard_sums_bias_like_whole_tensors), which pays for the processes once.


def test_unknown_rule():
    with pytest.raises(DeltakitError, match="unknown DRIFT rule"):
        drift_gradient(torch.ones(2), torch.ones(2), 1.0, "median")


PRIOR_NAMES = ["layers.0.self_attn.q_proj.weight", "layers.1.self_attn.v_proj.weight", "layers.1.mlp.down_proj.weight"]
IN_MEMORY = {
    "qwen2_5_vl": "model.language_model.",
    "llava": "model.language_model.",
    "idefics2": "model.text_model.",
    "qwen2": "model.",
}


@pytest.mark.parametrize("family", list(IN_MEMORY))
def test_bind_maps_canonical_names_to_in_memory_parameters(family, caplog):
    model = build_tiny(family)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(6)
    prior = DictPrior({n: torch.randn(params[IN_MEMORY[family] + n].shape, generator=gen) for n in PRIOR_NAMES},
                      alphas={PRIOR_NAMES[2]: 0.5})
    with caplog.at_level("INFO", logger="deltakit.drift"):
        bias = DriftBias.bind(model, prior, rule="gradnorm", alpha=2.0)
    assert bias.num_tensors == 3
    assert bias.num_params == sum(params[IN_MEMORY[family] + n].numel() for n in PRIOR_NAMES)
    assert "3 tensors" in caplog.text
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    for n, p in params.items():
        p.grad = grads[n].clone()
    bias.apply()
    for n, p in params.items():
        canonical = n[len(IN_MEMORY[family]):] if n.startswith(IN_MEMORY[family]) else None
        if canonical in PRIOR_NAMES:
            a = 2.0 * (0.5 if canonical == PRIOR_NAMES[2] else 1.0)
            torch.testing.assert_close(p.grad.double(), reference(grads[n], prior.tensors[canonical], a, "gradnorm"), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(p.grad, grads[n]), n


def test_bind_rejects_unmatched_tensor():
    model = build_tiny("qwen2_5_vl")
    prior = DictPrior({"layers.7.self_attn.q_proj.weight": torch.zeros(32, 32)})
    with pytest.raises(IncompatibleError, match="layers.7.self_attn.q_proj.weight.*matches no parameter"):
        DriftBias.bind(model, prior)


def test_bind_rejects_shape_mismatch():
    model = build_tiny("qwen2_5_vl")
    prior = DictPrior({"layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(IncompatibleError, match=r"shape \(3, 3\).*\(64, 32\)"):
        DriftBias.bind(model, prior)


def test_bind_rejects_frozen_parameter():
    model = build_tiny("qwen2_5_vl")
    model.model.language_model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    prior = DictPrior({"layers.0.mlp.up_proj.weight": torch.zeros(64, 32)})
    with pytest.raises(IncompatibleError, match="frozen"):
        DriftBias.bind(model, prior)


def test_apply_without_gradient_is_an_error():
    model = build_tiny("qwen2")
    bias = DriftBias.bind(model, DictPrior({"layers.0.mlp.up_proj.weight": torch.ones(64, 32)}))
    with pytest.raises(DeltakitError, match="no gradient"):
        bias.apply()


@pytest.mark.parametrize("prior_device", [None, "cpu"])
def test_bound_prior_keeps_its_dtype_and_biases_every_step(prior_device):
    # D stays in its stored dtype (bf16 here), and |D|^2, computed once at bind, gives the formula's bias on
    # each of several steps with different gradients (where D lives: the next test).
    model = build_tiny("qwen2_5_vl")
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(8)
    prior = DictPrior({n: torch.randn(params["model.language_model." + n].shape, generator=gen).bfloat16() for n in PRIOR_NAMES})
    bias = DriftBias.bind(model, prior, rule="adaptive", alpha=0.5, prior_device=prior_device)
    assert {t.prior.dtype for t in bias.targets} == {torch.bfloat16}
    for _ in range(3):
        grads = {n: torch.randn(params["model.language_model." + n].shape, generator=gen) for n in PRIOR_NAMES}
        for n in PRIOR_NAMES:
            params["model.language_model." + n].grad = grads[n].clone()
        bias.apply()
        for n in PRIOR_NAMES:
            want = reference(grads[n], prior.tensors[n].float(), 0.5, "adaptive")
            torch.testing.assert_close(params["model.language_model." + n].grad.double(), want, rtol=1e-5, atol=1e-6)


def test_prior_device_none_follows_the_parameter_cpu_pins_it():
    # This machine has no accelerator, so CPU parameters cannot tell "the parameter's device" from "cpu".
    # Parameters on the meta device can: prior_device=None puts each D on its parameter's device (meta),
    # prior_device="cpu" keeps it on the CPU whatever the parameters' device.
    model = build_tiny("qwen2_5_vl")
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(9)
    source = {n: torch.randn(params["model.language_model." + n].shape, generator=gen) for n in PRIOR_NAMES}
    # On CPU parameters, None gives a CPU D that is a copy: DictPrior.get returns the source tensor itself, and
    # a later in-place change to it must not move the bound prior.
    bias = DriftBias.bind(model, DictPrior(source))
    kept = {t.canonical: t.prior.clone() for t in bias.targets}
    for t in bias.targets:
        assert t.prior.device == t.param.device == torch.device("cpu")
        assert t.prior.untyped_storage().data_ptr() != source[t.canonical].untyped_storage().data_ptr()
        source[t.canonical].add_(1.0)
        assert torch.equal(t.prior, kept[t.canonical]), t.canonical
        source[t.canonical].sub_(1.0)
    meta = build_tiny("qwen2_5_vl").to("meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    follows = DriftBias.bind(meta, DictPrior(source), prior_device=None)
    pinned = DriftBias.bind(meta, DictPrior(source), prior_device="cpu")
    assert [t.prior.device.type for t in follows.targets] == ["meta"] * len(PRIOR_NAMES)
    assert [t.prior.device.type for t in pinned.targets] == ["cpu"] * len(PRIOR_NAMES)
    for t in pinned.targets:  # pinned on the CPU, with the source's values
        assert torch.equal(t.prior, source[t.canonical]), t.canonical


@pytest.mark.parametrize("compress", [None, "int8"])
def test_bind_a_prior_file_expands_it_per_tensor(tmp_path, compress):
    # A real `deltakit prior` file, compressed or not: each bound D is the (expanded) difference of the pair.
    from deltakit.prior import Prior, export_prior
    from deltakit.tiny import save_partner_llm, save_tiny

    mllm = save_tiny("qwen2_5_vl", tmp_path / "mllm", seed=0)
    llm = save_partner_llm(mllm, tmp_path / "llm", noise=0.5)
    export_prior(mllm, llm, tmp_path / "prior.safetensors", dtype="float32", compress=compress)
    model = build_tiny("qwen2_5_vl", seed=0)
    bias = DriftBias.bind(model, Prior.open(tmp_path / "prior.safetensors"))
    llm_model = transformers.Qwen2ForCausalLM.from_pretrained(llm, dtype=torch.float32)
    want = {n.removeprefix("model."): p.detach() for n, p in llm_model.named_parameters()}
    params = dict(model.named_parameters())
    assert bias.num_tensors == 20
    for t in bias.targets:
        d = want[t.canonical] - params[t.name].detach()
        assert t.prior.dtype == torch.float32 and t.prior.shape == d.shape
        # int8: per-row scale max|row|/127, so each entry is within half a step.
        tol = 0.0 if compress is None else float(d.abs().amax(dim=-1, keepdim=True).max()) / 127 / 2 + 1e-6
        assert float((t.prior - d).abs().max()) <= tol + 1e-6, t.canonical
