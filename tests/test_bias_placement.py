"""Where the DRIFT bias sits: before or after clipping (``bias_order``), per step or per micro-batch (``bias_at``).

Notation: ``g`` the data gradient of one tensor, ``D`` its prior, ``c(g)`` the rule's coefficient, ``M`` the clip
norm, ``clip`` scales the whole gradient (all tensors) by ``s = min(1, M / |all of it|)``. The *data part* of
the final gradient is what multiplies ``g``, the *prior part* what multiplies ``D``; AdamW normalises scale, so
their ratio ``|data| / |prior|`` is what the optimizer acts on.

- after_clip:  ``s g - c(s g) D``.  absolute: ``c = a``, ratio ``s |g| / (a |D|)``: clipping shrinks the data
  share by ``s``. gradnorm/adaptive: ``c(s g) = s c(g)`` (homogeneous), so the result is ``s (g - c(g) D)``:
  ratio ``|g| / (c(g) |D|)`` = ``1/a`` (gradnorm), ``2 / (a (1 + cos(g, D)))`` (adaptive), whatever ``s``.
- before_clip: ``s' (g - c(g) D)`` with ``s' = min(1, M / |g - c D|)``: every rule keeps ``|g| / (c(g) |D|)``.

So absolute defaults to before_clip (only it keeps the ratio); gradnorm and adaptive keep it in both orders,
which then differ by one scalar (``s`` against ``s'``), and default to after_clip (plain SFT's clip factor).

``bias_at: micro_batch`` gives ``sum_k (g_k - c(g_k) D)``, then clipping: it differs from the step placement
``g - c(g) D`` (``g = sum_k g_k``) by ``(sum_k c(g_k) - c(g)) D``: ``(K - 1) a D`` for absolute,
``a (sum_k |g_k| - |g|) / |D| D`` for gradnorm and half that for adaptive (its ``<g, D>`` term is linear).
"""

import math
import os

import pytest
import torch
import transformers
from torch.optim.optimizer import register_optimizer_step_pre_hook

from deltakit.drift import coefficients, drift_gradient, tensor_stats
from deltakit.train import ConfigError, TrainConfig, finetune
from deltakit.train import loop as loop_module
from train_helpers import DictPrior, collate, free_port, spawn, synthetic_examples

RULES = ("absolute", "gradnorm", "adaptive")
PRIOR_KINDS = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.v_proj.weight", "mlp.down_proj.weight")
LR, EPS = 1e-3, 1e-4


# ---------------------------------------------------------------- (1) the ratio, on plain tensors

def _clip(grads: dict, max_norm: float) -> float:
    """The factor torch.nn.utils.clip_grad_norm_ scales every gradient by."""
    total = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
    return min(1.0, max_norm / (total + 1e-6))


def _c(g, d, alpha, rule) -> float:
    return float(coefficients(tensor_stats(g, d), torch.tensor(alpha, dtype=torch.float64), rule))


def _parts(final: dict, data: dict, priors: dict) -> dict:
    """Per prior tensor: (|data part|, |prior part|); checks that final - data is a multiple of D."""
    out = {}
    for n, d in priors.items():
        prior_part = data[n] - final[n]
        k = float((prior_part * d).sum() / d.square().sum())
        torch.testing.assert_close(prior_part, k * d, rtol=0, atol=1e-12)
        out[n] = (float(data[n].norm()), abs(k) * float(d.norm()))
    return out


@pytest.mark.parametrize("rule", RULES)
def test_clip_order_and_the_data_to_prior_ratio(rule):
    gen = torch.Generator().manual_seed(0)
    g = {"w": torch.randn(6, 5, generator=gen, dtype=torch.float64) * 3, "b": torch.randn(4, generator=gen, dtype=torch.float64) * 2,
         "free": torch.randn(3, 3, generator=gen, dtype=torch.float64)}  # "free" carries no prior, but counts in the clip norm
    priors = {"w": torch.randn(6, 5, generator=gen, dtype=torch.float64) + 0.5 * g["w"], "b": torch.randn(4, generator=gen, dtype=torch.float64)}
    alpha, max_norm = 0.7, 1.0

    def bias(grads):
        return {n: drift_gradient(t, priors[n], alpha, rule) if n in priors else t for n, t in grads.items()}

    # after_clip: clip the data gradient by s, then bias.
    s = _clip(g, max_norm)
    data_after = {n: s * t for n, t in g.items()}
    after = bias(data_after)
    # before_clip: bias, then clip g - cD by s' (the clip norm includes the bias).
    h = bias(g)
    s_before = _clip(h, max_norm)
    before = {n: s_before * t for n, t in h.items()}
    after_parts, before_parts = _parts(after, data_after, priors), _parts(before, {n: s_before * t for n, t in g.items()}, priors)
    assert s < 0.2 and s_before < 0.2  # clipping is active in both orders

    for n, d in priors.items():
        c = _c(g[n], d, alpha, rule)
        unclipped = float(g[n].norm()) / (c * float(d.norm()))  # |g| / (c(g) |D|), the ratio without clipping
        cos = float((g[n] * d).sum() / (g[n].norm() * d.norm()))
        expected = {"absolute": float(g[n].norm()) / (alpha * float(d.norm())), "gradnorm": 1 / alpha,
                    "adaptive": 2 / (alpha * (1 + cos))}[rule]
        assert unclipped == pytest.approx(expected, rel=1e-6)
        assert before_parts[n][0] / before_parts[n][1] == pytest.approx(unclipped, rel=1e-6)  # kept, every rule
        if rule == "absolute":
            # c(s g) = a: after clipping the prior part stays a|D| while the data part shrinks to s|g|.
            assert _c(s * g[n], d, alpha, rule) == alpha
            assert after_parts[n][1] == pytest.approx(alpha * float(d.norm()), rel=1e-6)
            assert after_parts[n][0] / after_parts[n][1] == pytest.approx(s * unclipped, rel=1e-6)
            # before clipping: s' = M / |g - aD| (|D| sets the clip factor), data and prior shrink together.
            assert s_before == pytest.approx(max_norm / (math.sqrt(sum(float(t.square().sum()) for t in h.values())) + 1e-6))
        else:
            # homogeneous: c(s g) = s c(g), so after_clip = s (g - c(g) D) and before_clip = s' (g - c(g) D).
            assert _c(s * g[n], d, alpha, rule) == pytest.approx(s * c, rel=1e-6)
            assert after_parts[n][0] / after_parts[n][1] == pytest.approx(unclipped, rel=1e-6)
            tol = 1e-6 * float(h[n].abs().max())  # c goes through float32 statistics
            torch.testing.assert_close(after[n], s * h[n], rtol=0, atol=s * tol)
            torch.testing.assert_close(before[n], s_before * h[n], rtol=0, atol=s_before * tol)


@pytest.mark.parametrize("rule, order", [("absolute", "before_clip"), ("gradnorm", "after_clip"), ("adaptive", "after_clip")])
def test_auto_order_per_rule_and_config_checks(rule, order):
    config = TrainConfig(model="m", data="d", out="o", rule=rule).validated()
    assert (config.bias_order, config.bias_at, config.resolved_bias_order) == ("auto", "step", order)
    assert TrainConfig(model="m", data="d", out="o", rule=rule, bias_order="after_clip").resolved_bias_order == "after_clip"
    assert TrainConfig(model="m", data="d", out="o", rule=rule, bias_at="micro_batch").validated().resolved_bias_order == "before_clip"
    with pytest.raises(ConfigError, match="bias_order after_clip contradicts"):
        TrainConfig(model="m", data="d", out="o", bias_at="micro_batch", bias_order="after_clip").validated()
    with pytest.raises(ConfigError, match="bias_at must be one of"):
        TrainConfig.load(None, model="m", data="d", out="o", bias_at="rank")
    assert TrainConfig.load(None, model="m", data="d", out="o", bias_order="before_clip").bias_order == "before_clip"


# ---------------------------------------------------------------- the finetune API against steps written out

@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return tiny_checkpoint("qwen2_5_vl")  # the session's tiny Qwen2.5-VL (seed 0, float32), read-only


@pytest.fixture(scope="module")
def prior_tensors(base):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(11)
    return {f"layers.{i}.{k}": torch.randn(params[f"model.language_model.layers.{i}.{k}"].shape, generator=gen) * 0.05
            for i in range(2) for k in PRIOR_KINDS}


@pytest.fixture
def run(base, prior_tensors, tmp_path, monkeypatch):
    """One finetune() step; returns ({name: saved weight}, {name: the gradient AdamW stepped with})."""
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append([p.grad.detach().clone() for group in opt.param_groups for p in group["params"]]))

    def _run(n_examples, out, **kw):
        seen.clear()
        examples = synthetic_examples(n_examples, 0)
        monkeypatch.setattr(loop_module, "load_data", lambda config: (examples, collate, None))
        monkeypatch.setattr(loop_module, "open_prior", lambda path: DictPrior(prior_tensors))
        config = TrainConfig(**{**dict(model=str(base), data="synthetic.jsonl", out=str(tmp_path / out), lr=LR, warmup_ratio=0.0,
                                       max_steps=1, adam_eps=EPS, precision="fp32", prior="prior", alpha=1.0), **kw})
        finetune(config)
        model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / out, dtype=torch.float32)
        names = [n for n, _ in model.named_parameters() if not n.startswith("model.visual.")]
        assert len(seen) == 1 and len(seen[0]) == len(names)
        return {n: p.detach() for n, p in model.named_parameters()}, dict(zip(names, seen[0]))

    yield _run
    handle.remove()


def micro_gradients(base, micro):
    """Each micro-batch's gradient g_k (float64) as the loop defines it: its tokens' loss sum / all target tokens."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    batches = [collate(m) for m in micro]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    out = []
    for b, n in zip(batches, counts):
        model.zero_grad(set_to_none=True)
        (model(**b).loss * (n / sum(counts))).backward()  # HF's loss is the mean over the batch's target tokens
        out.append({n_: p.grad.double() for n_, p in model.named_parameters() if not n_.startswith("model.visual.")})
    return model, out


def biased(g, d, alpha, rule):
    """The rule written out: g - c D."""
    cos = float((g * d).sum()) / (float(g.norm()) * float(d.norm()))
    c = {"absolute": alpha, "gradnorm": alpha * float(g.norm()) / float(d.norm()),
         "adaptive": alpha * (1 + cos) / 2 * float(g.norm()) / float(d.norm())}[rule]
    return g - c * d


def written_out(base, micro, prior, rule, max_norm, order="after_clip", at="step", alpha=1.0):
    """One optimizer step by hand: (bias per micro-batch | sum, bias before clip), clip, (bias after clip), AdamW.

    Returns (new weights, the gradient AdamW steps with, the clip factor)."""
    model, gs = micro_gradients(base, micro)
    canon = {n: n.removeprefix("model.language_model.") for n in gs[0]}

    def bias_all(grads):
        return {n: biased(g, prior[canon[n]].double(), alpha, rule) if canon[n] in prior else g for n, g in grads.items()}

    if at == "micro_batch":
        parts = [bias_all(g) for g in gs]
        grads = {n: sum(p[n] for p in parts) for n in gs[0]}
    else:
        grads = {n: sum(g[n] for g in gs) for n in gs[0]}
        grads = bias_all(grads) if order == "before_clip" else grads
    scale = min(1.0, max_norm / (math.sqrt(sum(float(g.square().sum()) for g in grads.values())) + 1e-6)) if max_norm else 1.0
    grads = {n: g * scale for n, g in grads.items()}
    if at == "step" and order == "after_clip":
        grads = bias_all(grads)
    new = {}
    for n, p in model.named_parameters():
        if n not in grads:
            new[n] = p.detach().clone()
            continue
        g = grads[n]
        m, v = 0.1 * g / (1 - 0.9), 0.001 * g * g / (1 - 0.999)  # AdamW's bias-corrected first step
        new[n] = (p.detach().double() - LR * m / (v.sqrt() + EPS)).float()
    return new, grads, scale


def assert_step(got, want):
    weights, grads = got
    want_weights, want_grads, _ = want
    for n in want_grads:
        torch.testing.assert_close(grads[n].double(), want_grads[n], rtol=2e-5, atol=1e-9, msg=n)
    for n in want_weights:
        torch.testing.assert_close(weights[n], want_weights[n], rtol=1e-5, atol=2e-7, msg=n)


# ---------------------------------------------------------------- (2) bias_order through finetune()

@pytest.mark.parametrize("rule", RULES)
def test_bias_order_steps_match_written_out(run, base, prior_tensors, rule):
    examples = synthetic_examples(3, 0)
    auto = "before_clip" if rule == "absolute" else "after_clip"
    other = "after_clip" if rule == "absolute" else "before_clip"
    got = {auto: run(3, "default", rule=rule, batch_size=3, max_grad_norm=0.05),  # bias_order auto
           other: run(3, "explicit", rule=rule, batch_size=3, max_grad_norm=0.05, bias_order=other)}
    want = {o: written_out(base, [examples], prior_tensors, rule, 0.05, order=o) for o in ("after_clip", "before_clip")}
    s, s_before = want["after_clip"][2], want["before_clip"][2]
    # Clipping is active in both orders, with different factors (for gradnorm/adaptive only ~1% apart: the 8 prior
    # tensors carry a small part of |g|, so the bias barely changes the clip norm; still 500x the tolerance below).
    assert s < 0.5 and s_before < 0.5 and abs(s / s_before - 1) > 0.005
    # gradnorm/adaptive: the default is today's step (bias after clipping); absolute: after_clip is today's step.
    assert_step(got["after_clip"], want["after_clip"])
    assert_step(got["before_clip"], want["before_clip"])  # bias, then clip g - cD, then AdamW
    after, before = got["after_clip"][1], got["before_clip"][1]
    for canonical, d in prior_tensors.items():
        n, d = "model.language_model." + canonical, d.double()
        if rule == "absolute":
            # after: s g - a D (the data part shrinks, the prior part does not); before: s' (g - a D). So
            # after + a D = s g = s (before / s' + a D).
            torch.testing.assert_close(after[n].double() + d, s * (before[n].double() / s_before + d), rtol=0,
                                       atol=1e-6 * float(d.abs().max()))
        else:
            # homogeneous rule: one direction g - c(g) D, scaled by s after clipping and by s' before
            torch.testing.assert_close(after[n].double() / s, before[n].double() / s_before, rtol=1e-4,
                                       atol=1e-6 * float((after[n].double() / s).abs().max()))


# ---------------------------------------------------------------- (3) bias_at micro_batch on a 2-micro-batch step

@pytest.mark.parametrize("rule", RULES)
def test_micro_batch_is_the_sum_of_biased_micro_batch_gradients(run, base, prior_tensors, rule):
    examples = synthetic_examples(2, 0)
    micro = [[examples[0]], [examples[1]]]  # the step's order of micro-batches does not matter: the result is a sum
    got = run(2, "micro", rule=rule, batch_size=1, grad_accum=2, max_grad_norm=0.5, bias_at="micro_batch")
    want = written_out(base, micro, prior_tensors, rule, 0.5, at="micro_batch")
    assert want[2] < 1  # clipping active
    assert_step(got, want)

    # Against the default (step) placement, without clipping so that only the placement differs:
    # step - micro = (c(g_1) + c(g_2) - c(g_1 + g_2)) D on prior tensors, 0 elsewhere.
    _, per_micro = micro_gradients(base, micro)
    _, g_micro = run(2, "micro0", rule=rule, batch_size=1, grad_accum=2, max_grad_norm=0.0, bias_at="micro_batch")
    _, g_step = run(2, "step0", rule=rule, batch_size=1, grad_accum=2, max_grad_norm=0.0)
    for n in g_step:
        canonical = n.removeprefix("model.language_model.")
        diff = g_step[n].double() - g_micro[n].double()
        if canonical not in prior_tensors:
            torch.testing.assert_close(diff, torch.zeros_like(diff), rtol=0, atol=1e-8, msg=n)
            continue
        d = prior_tensors[canonical].double()
        g1, g2 = per_micro[0][n], per_micro[1][n]
        excess = float(g1.norm() + g2.norm() - (g1 + g2).norm())  # >= 0, the triangle inequality
        want_dc = {"absolute": 1.0, "gradnorm": excess / float(d.norm()), "adaptive": excess / (2 * float(d.norm()))}[rule]
        dc = float((diff * d).sum() / d.square().sum())
        assert want_dc > 0 and dc == pytest.approx(want_dc, rel=1e-3), n
        torch.testing.assert_close(diff, dc * d, rtol=0, atol=1e-4 * float((dc * d).abs().max()), msg=n)


# ---------------------------------------------------------------- micro_batch under DDP and FSDP2

def _ddp_worker(rank, world, port, config, prior):
    torch.set_num_threads(1)
    loop_module.load_data = lambda c: (synthetic_examples(2, 0), collate, None)
    loop_module.open_prior = lambda path: DictPrior(prior)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    finetune(config)


@pytest.mark.slow
def test_micro_batch_under_ddp_biases_each_rank_before_the_all_reduce(run, base, prior_tensors, tmp_path):
    # 2 ranks x 1 micro-batch: each rank biases its local gradient (2 g_r: DDP averages), then DDP averages:
    # g - (c(2 g_0) + c(2 g_1)) / 2 D, which for gradnorm is g - (c(g_0) + c(g_1)) D, the 1-process 2-micro-batch result.
    config = TrainConfig(model=str(base), data="synthetic.jsonl", out=str(tmp_path / "ddp"), lr=LR, warmup_ratio=0.0, max_steps=1,
                         adam_eps=EPS, precision="fp32", prior="prior", rule="gradnorm", batch_size=1, max_grad_norm=0.0,
                         strategy="ddp", bias_at="micro_batch")
    spawn(_ddp_worker, 2, free_port(), config, prior_tensors)
    ddp = {n: p.detach() for n, p in transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "ddp", dtype=torch.float32).named_parameters()}
    micro, _ = run(2, "micro", rule="gradnorm", batch_size=1, grad_accum=2, max_grad_norm=0.0, bias_at="micro_batch")
    step, _ = run(2, "step", rule="gradnorm", batch_size=1, grad_accum=2, max_grad_norm=0.0)
    for n in micro:
        torch.testing.assert_close(ddp[n], micro[n], rtol=1e-5, atol=1e-6, msg=n)
    assert max(float((ddp[n] - step[n]).abs().max()) for n in step) > 1e-5


def test_micro_batch_is_refused_under_fsdp(base, tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="bias_at micro_batch is not supported under FSDP2"):
        finetune(TrainConfig(model=str(base), data="d.jsonl", out=str(tmp_path / "o"), prior="p", strategy="fsdp", bias_at="micro_batch"))
