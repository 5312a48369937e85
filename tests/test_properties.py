"""Properties of the merge formulas (``deltakit.merge.methods``) and the DRIFT rules (``deltakit.drift``), on small
float64 tensors drawn by hypothesis: identities that must hold bit for bit, and the documented scalings of the
rule coefficient ``c`` of ``g' = g - c D`` to 1e-12 relative.

The coefficient properties feed :func:`coefficients` float64 statistics computed here; :func:`tensor_stats`
accumulates in float32 (documented), so the end-to-end ``drift_gradient`` check is looser.
"""

from __future__ import annotations

import math

import pytest
import torch

from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import array_shapes, arrays  # noqa: E402

from deltakit.drift import EPS, coefficients, drift_gradient, tensor_stats  # noqa: E402
from deltakit.drift_rules import RULES  # noqa: E402
from deltakit.merge.config import MergeConfig  # noqa: E402
from deltakit.merge.methods import linear, merge_tensor, task_arithmetic  # noqa: E402

SETTINGS = settings(max_examples=100, derandomize=True, deadline=None, database=None)
RTOL = 1e-12
# No subnormals (their few bits of precision are not what the properties are about): 0 or 1e-100 <= |v| <= 100.
VALUES = st.just(0.0) | st.floats(1e-100, 100) | st.floats(-100, -1e-100)
WEIGHTS = st.floats(0.01, 2)
SIGNED_WEIGHTS = st.floats(-2, 2).filter(lambda w: abs(w) >= 1e-3)
DENSITIES = st.floats(0.01, 1)
SCALES = st.floats(1e-3, 1e3)
ALPHAS = st.just(0.0) | st.floats(1e-100, 2)


@st.composite
def tensors(draw, n: int) -> list[torch.Tensor]:
    """``n`` float64 tensors of one small shape (1-D or 2-D, at most 5 x 5)."""
    shape = draw(array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=5))
    return [torch.from_numpy(draw(arrays("float64", shape, elements=VALUES))) for _ in range(n)]


def close(a: float | torch.Tensor, b: float | torch.Tensor, scale: float | None = None) -> bool:
    """``|a - b| <= RTOL * scale`` (``scale`` defaults to ``max(|a|, |b|)``), elementwise."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    bound = RTOL * (torch.maximum(a.abs(), b.abs()) if scale is None else torch.as_tensor(scale, dtype=torch.float64))
    return bool(((a - b).abs() <= bound).all())


# -- merge methods ----------------------------------------------------------------------------------------
@SETTINGS
@given(tensors(2), st.booleans())
def test_linear_at_alpha_one_is_the_mllm_exactly(xs, normalize):
    mllm, llm = xs
    assert torch.equal(linear([mllm, llm], [1.0, 0.0], normalize), mllm)


def test_alpha_one_recipe_gives_the_llm_weight_zero():
    cfg = MergeConfig.simple("MLLM", "LLM", alpha=1.0)
    assert [m.parameters["weight"] for m in cfg.models] == [1.0, 0.0]


@SETTINGS
@given(tensors(2), SIGNED_WEIGHTS, st.floats(-2, 2), st.booleans())
def test_ties_at_density_one_with_one_model_is_task_arithmetic(xs, weight, lambda_, normalize):
    base, x = xs
    expected = task_arithmetic(base, [x], [weight], lambda_, normalize)
    assert torch.equal(merge_tensor("ties", base, [x], weight=[weight], density=[1.0], lambda_=lambda_, normalize=normalize), expected)


@SETTINGS
@given(tensors(1), st.lists(WEIGHTS, min_size=1, max_size=4))
def test_linear_of_a_model_with_itself_is_the_model(xs, weights):
    (x,) = xs
    merged = linear([x] * len(weights), weights, normalize=True)
    assert close(merged, x, x.abs())


@SETTINGS
@given(tensors(1), st.lists(SIGNED_WEIGHTS, min_size=1, max_size=4), st.floats(-2, 2), st.booleans())
def test_task_arithmetic_with_the_model_as_base_is_the_model(xs, weights, lambda_, normalize):
    (x,) = xs
    assert torch.equal(task_arithmetic(x, [x] * len(weights), weights, lambda_, normalize), x)


@SETTINGS
@given(tensors(1), st.lists(st.tuples(SIGNED_WEIGHTS, DENSITIES, st.integers(0, 2**62)), min_size=1, max_size=3),
       st.floats(-2, 2), st.booleans(), st.booleans())
def test_ties_and_dare_with_the_model_as_base_are_the_model_at_any_density(xs, models, lambda_, normalize, rescale):
    (x,) = xs
    weights, densities, seeds = (list(v) for v in zip(*models))
    n = len(models)
    for method in ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"):
        got = merge_tensor(method, x, [x] * n, seeds, weight=weights, density=densities, lambda_=lambda_, normalize=normalize,
                           rescale=rescale)
        assert torch.equal(got, x), method


@SETTINGS
@given(tensors(2), st.lists(WEIGHTS, min_size=1, max_size=3), st.integers(0, 2**62))
def test_normalized_ties_and_dare_at_density_one_of_one_model_repeated_are_the_model(xs, weights, seed):
    base, x = xs
    n = len(weights)
    scale = base.abs() + x.abs()  # b + ((x - b) w / w) rounds at the size of |b| and |x|
    for method in ("ties", "dare_linear", "dare_ties", "breadcrumbs", "della", "della_linear"):
        got = merge_tensor(method, base, [x] * n, [seed] * n, weight=weights, density=[1.0] * n, normalize=True)
        assert close(got, x, 4 * scale), method


@settings(SETTINGS, max_examples=30)
@given(tensors(2), st.floats(0, 1), st.lists(WEIGHTS, min_size=2, max_size=2))
def test_spherical_and_stock_merges_of_a_model_with_itself_are_the_model(xs, t, weights):
    base, x = xs
    assume(float(x.norm()) > 1e-3)  # karcher leaves out tensors of norm <= tol (1e-5), as mergekit
    scale = 4 * (x.abs() + base.abs())
    assert close(merge_tensor("slerp", x, [x], t=t), x, scale), "slerp"
    assert close(merge_tensor("nuslerp", None, [x, x], weight=weights), x, scale), "nuslerp"
    assert close(merge_tensor("multislerp", None, [x, x], weight=weights), x, scale), "multislerp"
    assert close(merge_tensor("karcher", None, [x, x, x]), x, scale), "karcher"
    assert close(merge_tensor("model_stock", base, [x, x]), x, scale), "model_stock"
    assert close(merge_tensor("sce", base, [x, x]), x, scale), "sce"


@settings(SETTINGS, max_examples=30)
@given(tensors(2))
def test_nearswap_at_t_zero_is_the_base(xs):
    base, x = xs
    assert torch.equal(merge_tensor("nearswap", base, [x], t=0.0), base)


# -- DRIFT rules ------------------------------------------------------------------------------------------
def stats64(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``[|g|^2, |D|^2, <g, D>]`` summed in float64."""
    return torch.stack([(g * g).sum(), (d * d).sum(), (g * d).sum()])


def coef(g: torch.Tensor, d: torch.Tensor, alpha: float, rule: str) -> float:
    return float(coefficients(stats64(g, d), torch.tensor(alpha, dtype=torch.float64), rule))


def norm(t: torch.Tensor) -> float:
    return math.sqrt(float((t * t).sum()))


@SETTINGS
@given(tensors(2), st.sampled_from(RULES))
def test_alpha_zero_leaves_the_gradient_unchanged(xs, rule):
    g, d = xs
    assert coef(g, d, 0.0, rule) == 0.0
    assert torch.equal(drift_gradient(g, d, 0.0, rule), g)


@SETTINGS
@given(tensors(1), ALPHAS, st.sampled_from(RULES))
def test_zero_prior_gives_zero_coefficient_under_every_rule(xs, alpha, rule):
    (g,) = xs
    zero = torch.zeros_like(g)
    assert coef(g, zero, alpha, rule) == 0.0
    assert torch.equal(drift_gradient(g, zero, alpha, rule), g)


@SETTINGS
@given(tensors(1), ALPHAS)
def test_zero_gradient_gives_zero_coefficient_for_gradnorm_and_adaptive(xs, alpha):
    (d,) = xs
    zero = torch.zeros_like(d)
    assert coef(zero, d, alpha, "gradnorm") == 0.0 and coef(zero, d, alpha, "adaptive") == 0.0


@SETTINGS
@given(tensors(2), ALPHAS)
def test_rule_coefficients_as_documented(xs, alpha):
    g, d = xs
    assume(norm(g) > 1e-6 and norm(d) > 1e-6)
    absolute, gradnorm, adaptive = (coef(g, d, alpha, r) for r in ("absolute", "gradnorm", "adaptive"))
    assert absolute == alpha
    assert close(gradnorm * norm(d), alpha * norm(g))
    assert 0.0 <= adaptive <= gradnorm
    cos = float(stats64(g, d)[2]) / (norm(g) * norm(d))
    assert close(adaptive, gradnorm * (1 + max(-1.0, min(1.0, cos))) / 2, gradnorm)


@SETTINGS
@given(tensors(1), SCALES, ALPHAS)
def test_adaptive_is_gradnorm_when_parallel_and_zero_when_antiparallel(xs, k, alpha):
    (d,) = xs
    assume(norm(d) > 1e-6)
    gradnorm = coef(k * d, d, alpha, "gradnorm")
    assert close(coef(k * d, d, alpha, "adaptive"), gradnorm)
    assert close(gradnorm, alpha * k)
    assert abs(coef(-k * d, d, alpha, "adaptive")) <= RTOL * coef(-k * d, d, alpha, "gradnorm")


@SETTINGS
@given(tensors(2), SCALES, ALPHAS)
def test_coefficients_scale_with_g_and_inversely_with_d(xs, k, alpha):
    g, d = xs
    assume(norm(g) > 1e-6 and norm(d) > 1e-6)
    assert coef(k * g, d, alpha, "absolute") == coef(g, k * d, alpha, "absolute") == alpha
    for rule in ("gradnorm", "adaptive"):
        c = coef(g, d, alpha, rule)
        assert close(coef(k * g, d, alpha, rule), k * c), rule
        assert close(coef(g, k * d, alpha, rule), c / k), rule


@SETTINGS
@given(st.lists(tensors(2), min_size=1, max_size=4), st.lists(ALPHAS, min_size=4, max_size=4), st.sampled_from(RULES))
def test_rows_of_stats_are_independent(pairs, alphas, rule):
    stats = torch.stack([stats64(g, d) for g, d in pairs])
    alpha = torch.tensor(alphas[: len(pairs)], dtype=torch.float64)
    batched = coefficients(stats, alpha, rule)
    assert torch.equal(batched, torch.stack([coefficients(s, a, rule) for s, a in zip(stats, alpha)]))


@SETTINGS
@given(tensors(2), ALPHAS, st.sampled_from(RULES))
def test_drift_gradient_is_g_minus_c_d(xs, alpha, rule):
    g, d = xs
    assume(norm(g) > 1e-3 and norm(d) > 1e-3)
    c = coef(g, d, alpha, rule)
    scale = g.abs() + abs(c) * d.abs() + EPS
    # tensor_stats sums in float32 (documented): c is right to ~1e-6 relative, not to float64 rounding.
    assert bool(((drift_gradient(g, d, alpha, rule) - (g - c * d)).abs() <= 1e-5 * scale).all())
    assert torch.allclose(tensor_stats(g, d), stats64(g, d), rtol=1e-5, atol=1e-5 * float(stats64(g, g)[0] + stats64(d, d)[0]))
