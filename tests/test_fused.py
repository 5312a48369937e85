"""The fused kernels (deltakit.engine.fused) against their formulas, written here as torch float32 and float64 operations.

Each test runs the C kernels (built from deltakit/engine/_fused.c by ``pip install -e .``) and the torch path that
replaces them where they are not built. The engine's use of them in a merge is tested in tests/test_merge_methods.py.
"""

from __future__ import annotations

import pytest
import torch

from deltakit.engine import fused

SIZES = (1, 7, 1024, 1031, 5000)  # a tile is 1024 entries; the torch path's vector tails are < 16
WEIGHTS = (0.37, -1.3, 0.2)


def test_the_c_kernels_are_built():
    assert fused.native() is not None, "deltakit/engine/_fused.c was not built (pip install -e . needs a C compiler)"
    assert fused.reads(torch.bfloat16) and fused.reads(torch.float32) and not fused.reads(torch.float16)


@pytest.fixture(params=["c", "torch"])
def path(request, monkeypatch) -> str:
    """Run the test with the C kernels, or with them switched off (the torch path)."""
    if request.param == "torch":
        monkeypatch.setattr(fused, "native", lambda: None)
    return request.param


def _inputs(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=g).to(dtype) for _ in WEIGHTS]
    return xs, (torch.randn(n, generator=g) * 0.5).to(dtype)


def _formula(xs, weights, base, divisor, scale, fma) -> torch.Tensor:
    """The documented order in float32, each operation rounded once; a fused multiply-add as the float64 sum of the
    exact float64 product, rounded to float32 (the same but for a double rounding, about 1 in 2**29 entries)."""
    w = torch.tensor(weights, dtype=torch.float32)
    b = None if base is None else base.float()
    v = [x.float() if b is None else x.float() - b for x in xs]
    acc = v[0] * w[0]
    for vi, wi in zip(v[1:], w[1:]):
        acc = (acc.double() + vi.double() * wi.double()).float() if fma else acc + vi * wi
    acc = acc / torch.tensor(divisor, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)
    return acc if b is None else acc + b


@pytest.mark.parametrize("fma", [False, True])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_base", [False, True])
def test_combine_is_its_formula_bit_for_bit(path, fma, stored, out_dtype, with_base):
    for n in SIZES:
        xs, b = _inputs(n, stored, seed=n)
        base = b if with_base else None
        assert (fused._native_inputs(xs, base) is not None) == (path == "c")
        got = fused.combine(xs, WEIGHTS, base=base, divisor=0.7, scale=0.9, fma=fma, dtype=torch.float32, out_dtype=out_dtype)
        want = _formula(xs, WEIGHTS, base, 0.7, 0.9, fma).to(out_dtype)
        assert got.dtype == out_dtype and got.shape == (n,)
        assert torch.equal(got, want), f"n={n}: {int((got != want).sum())} entries differ"


def test_combine_keeps_the_shape_and_falls_back_on_views_and_many_inputs(path):
    """Non-contiguous inputs and more than the C kernels' 16 inputs take the torch path, with the same result."""
    g = torch.Generator().manual_seed(3)
    m = [torch.randn(40, 24, generator=g).to(torch.bfloat16) for _ in range(2)]
    views = [x.t() for x in m]
    assert fused._native_inputs(views, None) is None
    got = fused.combine(views, [0.25, 0.75], fma=True, dtype=torch.float32, out_dtype=torch.bfloat16)
    assert got.shape == (24, 40)
    assert torch.equal(got, _formula(views, [0.25, 0.75], None, 1.0, 1.0, True).to(torch.bfloat16))
    many = [torch.randn(300, generator=g) for _ in range(17)]
    weights = [1 / 17] * 17
    assert fused._native_inputs(many, None) is None
    assert torch.equal(fused.combine(many, weights), _formula(many, weights, None, 1.0, 1.0, False))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_base", [False, True])
def test_gram_is_the_float64_gram_matrix(path, stored, with_base):
    """C: float32 differences, float64 products and sums (1e-12 relative here), the lower triangle mirrored; torch:
    within 2e-7 |v_i| |v_j|."""
    for n in SIZES:
        xs, b = _inputs(n, stored, seed=n + 1)
        base = b if with_base else None
        v = torch.stack([x.float() - (0 if base is None else base.float()) for x in xs]).double()
        want = v @ v.T
        got = fused.gram(xs, base=base)
        scale = torch.outer(want.diagonal().sqrt(), want.diagonal().sqrt())
        error = float(((got - want).abs() / scale).max())
        assert got.dtype == torch.float64 and (path == "torch" or torch.equal(got, got.T))
        assert error <= (1e-12 if path == "c" else 2e-7), error


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_nearswap_is_mergekits_expression_bit_for_bit(path, stored, out_dtype):
    """mergekit 0.1.5's nearswap in float32: ``w = (t / |a - b|.clamp(min=1e-6)).clamp(0, 1)``, ``w b + (1 - w) a``,
    with its rounding (torch takes ``t / d`` as a reciprocal, then a product), written here entry by entry in float64
    and rounded to float32 after each operation, on entries near, at and far from the base."""
    for n in SIZES:
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, generator=g).to(stored)
        b = (a.float() + torch.randn(n, generator=g) * 10 ** torch.randint(-8, 0, (n,), generator=g)).to(stored)
        b[::5] = a[::5]  # equal entries: |a - b| = 0, clamped to 1e-6
        t = 0.001
        f = lambda x: x.float().double()  # noqa: E731  (a float32 value, held in float64)
        r32 = lambda x: x.float().double()  # noqa: E731  (round to float32)
        d = r32((f(a) - f(b)).abs())
        d = torch.where(d < r32(torch.tensor(1e-6)), r32(torch.tensor(1e-6)), d)
        w = r32(r32(1 / d) * r32(torch.tensor(t))).clamp(0, 1)
        want = r32(r32(w * f(b)) + r32(r32(1 - w) * f(a))).float().to(out_dtype)
        got = fused.nearswap(b, a, t, dtype=torch.float32, out_dtype=out_dtype)
        assert (fused._native_inputs([b], a) is not None) == (path == "c")
        assert torch.equal(got, want), f"n={n}: {int((got != want).sum())} entries differ"


@pytest.mark.parametrize("seed", [0, 5, 2**32 + 3, 2**63 - 1, 2**64 - 1])
def test_uniform_is_torch_rand_bit_for_bit(path, seed):
    for n in (1, 623, 624, 625, 1248, 5000):
        assert torch.equal(fused.uniform(n, seed), torch.rand(n, generator=torch.Generator().manual_seed(seed))), (seed, n)


def test_pack_and_unpack_are_little_endian_bits():
    keep = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert fused.pack(keep).tolist() == [1 + 8 + 16, 1 + 2]
    assert torch.equal(fused.unpack(fused.pack(keep), 10), keep)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_dare_mask_is_u_below_the_density_with_float64_sums(path, stored):
    for n in SIZES:
        xs, b = _inputs(n, stored, seed=n)
        u = torch.rand(n, generator=torch.Generator().manual_seed(n))
        bits, before, after = fused.sparse_mask(xs[0], b, u, 0.3)
        want = u < torch.tensor(0.3, dtype=torch.float32)
        assert torch.equal(fused.unpack(bits, n), want)
        d = (xs[0].float() - b.float()).abs().double()
        assert before == pytest.approx(float(d.sum()), rel=1e-12) and after == pytest.approx(float(d[want].sum()), rel=1e-12)


def _sparse_formula(xs, weights, base, masks, factors, consensus, normalize, divisor, scale) -> torch.Tensor:
    """TIES / DARE's mix in float32, written entry by entry as sums of terms (mergekit's sign election: a term counts
    when its sign is the sign of the sum, >= 0 counting as +)."""
    w = [torch.tensor(x, dtype=torch.float32) for x in weights]
    b = base.float()
    terms = []
    for x, wi, keep, f in zip(xs, w, masks, factors):
        d = x.float() - b
        if keep is not None:
            d = d * keep.float()
        d = d * torch.tensor(1.0 if f is None else f, dtype=torch.float32)
        terms.append(d * wi)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    if not consensus:
        mixed = total / torch.tensor(divisor, dtype=torch.float32) if normalize else total
    else:
        sign = torch.where(total >= 0, 1.0, -1.0)
        agree = [torch.sign(t) == sign for t in terms]
        mixed = torch.zeros_like(total)
        div = torch.zeros_like(total)
        for t, a, wi in zip(terms, agree, w):
            mixed = mixed + torch.where(a, t, torch.zeros_like(t))
            div = div + torch.where(a, wi, torch.zeros_like(t))
        if normalize:
            mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
    return mixed * torch.tensor(scale, dtype=torch.float32) + b


@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_sparse_combine_is_its_formula(path, consensus, normalize, stored):
    """Against the formula: without consensus bit for bit; with it to float32 rounding (the kernel sums the positive and
    the negative terms apart, the formula the agreeing ones)."""
    for n in SIZES:
        xs, b = _inputs(n, stored, seed=n)
        g = torch.Generator().manual_seed(n)
        keeps = [torch.rand(n, generator=g) < 0.4, None, torch.rand(n, generator=g) < 0.7]
        masks = [None if k is None else fused.pack(k) for k in keeps]
        factors = [2.5, None, 1.25]
        got = fused.sparse_combine(xs, WEIGHTS, base=b, masks=masks, factors=factors, consensus=consensus,
                                   normalize=normalize, divisor=0.7, scale=0.9, dtype=torch.float32, out_dtype=torch.float32)
        want = _sparse_formula(xs, WEIGHTS, b, keeps, factors, consensus, normalize, 0.7, 0.9)
        if consensus:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want), n
        assert got.shape == xs[0].shape and got.dtype == torch.float32
