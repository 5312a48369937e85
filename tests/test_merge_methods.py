"""The merge methods added after TIES/DARE, each against a formula written here (numpy, float64), then every
method end to end: streamed through the engine in small blocks on a tiny Qwen2.5-VL + LLM pair, equal to the
whole-tensor formula, loaded by transformers and run on an image.

mergekit parity of the same methods is in tests/test_merge_mergekit.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deltakit.merge import METHODS, MergeConfig, MergeConfigError, merge
from deltakit.merge.methods import DARE_BLOCK, merge_tensor
from deltakit.tiny import SPECIAL, save_partner_llm, save_tiny


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def xs() -> dict[str, torch.Tensor]:
    """A base and three correlated fine-tunes of it (float64, 24 x 40), as a merge sees them."""
    base = _rand(24, 40, seed=0)
    return {"base": base, **{k: base + 0.3 * _rand(24, 40, seed=i) for i, k in enumerate("abc", 1)}}


def close(got: torch.Tensor, want: np.ndarray, tol: float = 1e-12) -> None:
    np.testing.assert_allclose(got.numpy(), want, rtol=tol, atol=tol)


def _np(*ts: torch.Tensor) -> list[np.ndarray]:
    return [t.numpy() for t in ts]


# -- spherical interpolations -------------------------------------------------------------------------------
def test_slerp_formula(xs):
    a, b = _np(xs["a"], xs["b"])
    cos = (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)
    theta = np.arccos(cos)
    for t in (0.0, 0.3, 1.0):
        want = np.sin((1 - t) * theta) / np.sin(theta) * a + np.sin(t * theta) / np.sin(theta) * b
        close(merge_tensor("slerp", xs["a"], [xs["b"]], t=t), want)
    # near-parallel tensors (|cos| > 0.9995) interpolate linearly
    close(merge_tensor("slerp", xs["a"], [xs["a"] * 2], t=0.25), 0.75 * a + 0.25 * 2 * a)


def test_nuslerp_formulas(xs):
    a, b, base = _np(xs["a"], xs["b"], xs["base"])

    def slerp(t, v0, v1, axis):  # per vector along ``axis``; mergekit's nuslerp does not renormalise the result
        cos = (v0 * v1).sum(axis, keepdims=True) / np.linalg.norm(v0, axis=axis, keepdims=True) / np.linalg.norm(v1, axis=axis, keepdims=True)
        theta = np.arccos(cos)
        return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)

    t = 0.8 / (0.2 + 0.8)
    close(merge_tensor("nuslerp", None, [xs["a"], xs["b"]], weight=[0.2, 0.8]), slerp(t, a.reshape(1, -1), b.reshape(1, -1), 1).reshape(a.shape))
    close(merge_tensor("nuslerp", xs["base"], [xs["a"], xs["b"]], weight=[0.2, 0.8]),
          base + slerp(t, (a - base).reshape(1, -1), (b - base).reshape(1, -1), 1).reshape(a.shape))
    close(merge_tensor("nuslerp", None, [xs["a"], xs["b"]], weight=[0.2, 0.8], nuslerp_flatten=False), slerp(t, a, b, 1))
    close(merge_tensor("nuslerp", xs["base"], [xs["a"], xs["b"]], weight=[0.2, 0.8], nuslerp_flatten=False, nuslerp_row_wise=True),
          base + slerp(t, a - base, b - base, 0))
    close(merge_tensor("nuslerp", None, [xs["a"], xs["b"]], weight=[0.0, 0.0]), slerp(0.5, a.reshape(1, -1), b.reshape(1, -1), 1).reshape(a.shape))


def _multislerp_mergekit(tensors: list[np.ndarray], weights: list[float], base: np.ndarray | None, eps: float = 1e-8) -> np.ndarray:
    """mergekit 0.1.5's multislerp, step by step: unit vectors, weighted mean, tangent projection, exponential map."""
    v = np.stack([t - (0 if base is None else base) for t in tensors]).reshape(len(tensors), -1)
    w = np.asarray(weights) / np.sum(weights)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    units = v / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean /= np.linalg.norm(mean)
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    result = (mean * np.cos(tn) + tangent * np.sin(tn) / tn) * (norms[:, 0] * w).sum()
    return result.reshape(tensors[0].shape) + (0 if base is None else base)


def test_multislerp_equals_mergekits_tangent_space_algorithm(xs):
    ts = _np(xs["a"], xs["b"], xs["c"])
    w = [0.5, 0.3, 0.2]
    close(merge_tensor("multislerp", None, [xs[k] for k in "abc"], weight=w), _multislerp_mergekit(ts, w, None), 1e-10)
    close(merge_tensor("multislerp", xs["base"], [xs[k] for k in "abc"], weight=w), _multislerp_mergekit(ts, w, xs["base"].numpy()), 1e-10)
    close(merge_tensor("multislerp", None, [xs["a"]], weight=[0.4]), ts[0])  # one model: that model
    with pytest.raises(Exception, match="weighted sum of the unit tensors is zero"):
        merge_tensor("multislerp", None, [xs["a"], -xs["a"], xs["a"] * 0 + 1e-30], weight=[1.0, 1.0, 0.0])


def _karcher_mergekit(tensors: list[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """mergekit 0.1.5's Karcher mean iteration on the flattened tensors, written out."""
    alphas = [1 / len(tensors)] * len(tensors)
    norms = [np.linalg.norm(t) for t in tensors]
    units = [t.reshape(-1) / n for t, n in zip(tensors, norms)]
    mean = sum(a * u for a, u in zip(alphas, units))
    mean /= np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for a, u in zip(alphas, units):
            dot = np.clip(mean @ u, -1, 1)
            theta = np.arccos(dot)
            if theta < tol:
                continue
            tangent += a * theta / np.sin(theta) * (u - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * tangent / tn
        mean /= np.linalg.norm(mean)
    return (sum(a * n for a, n in zip(alphas, norms)) * mean).reshape(tensors[0].shape)


def test_karcher_equals_the_iteration_on_the_tensors(xs):
    ts = _np(xs["a"], xs["b"], xs["c"])
    close(merge_tensor("karcher", None, [xs[k] for k in "abc"]), _karcher_mergekit(ts), 1e-10)
    close(merge_tensor("karcher", None, [xs[k] for k in "ab"], max_iter=1), _karcher_mergekit(ts[:2], max_iter=1), 1e-10)
    # a model with itself is the model
    close(merge_tensor("karcher", None, [xs["a"], xs["a"]]), ts[0])


# -- Model Stock, NearSwap, SCE --------------------------------------------------------------------------------
def test_model_stock_formula(xs):
    base, a, b, c = _np(xs["base"], xs["a"], xs["b"], xs["c"])

    def stock(ws, w0, axis=None):
        d = [w - w0 for w in ws]
        cos = np.mean([(d[i] * d[j]).sum(axis=axis, keepdims=axis is not None)
                       / (np.linalg.norm(d[i], axis=axis, keepdims=axis is not None) * np.linalg.norm(d[j], axis=axis, keepdims=axis is not None))
                       for i in range(len(d)) for j in range(i + 1, len(d))], axis=0)
        t = len(ws) * cos / (1 + (len(ws) - 1) * cos)
        return t * sum(ws) / len(ws) + (1 - t) * w0

    close(merge_tensor("model_stock", xs["base"], [xs[k] for k in "abc"]), stock([a, b, c], base))
    close(merge_tensor("model_stock", xs["base"], [xs[k] for k in "ab"], filter_wise=True), stock([a, b], base, axis=1))
    # opposite deltas: cos = -1 makes 1 + (N - 1) cos vanish for N = 2: the base is kept
    close(merge_tensor("model_stock", xs["base"], [xs["base"] + 1, xs["base"] - 1]), base)


def test_nearswap_formula(xs):
    base, a = _np(xs["base"], xs["a"])
    w = np.clip(0.1 / np.maximum(np.abs(base - a), 1e-6), 0, 1)
    close(merge_tensor("nearswap", xs["base"], [xs["a"]], t=0.1), w * a + (1 - w) * base)


def test_sce_formula(xs):
    base = xs["base"].numpy()
    tv = np.stack([xs[k].numpy() - base for k in "abc"])
    for topk in (1.0, 0.3):
        d = tv.copy()
        if topk < 1:
            var = tv.var(axis=0)
            k = int(np.count_nonzero(var) * topk)
            mask = np.zeros(var.size)
            mask[np.argsort(-var.ravel(), kind="stable")[:k]] = 1
            d = d * mask.reshape(var.shape)
        w = (d ** 2).reshape(3, -1).mean(1)
        w = w / w.sum()
        sign = np.where(d.sum(0) >= 0, 1.0, -1.0)
        erased = w[:, None, None] * (np.sign(d) == sign)
        want = base + (d * erased).sum(0) / np.maximum(erased.sum(0), 1e-6)
        close(merge_tensor("sce", xs["base"], [xs[k] for k in "abc"], select_topk=topk), want)


# -- sparsified task arithmetic: Breadcrumbs, DELLA, the L1 rescale -------------------------------------------
def _combine(base, deltas, weights, consensus, lam, normalize):
    """mergekit's generalized task arithmetic after sparsification (numpy)."""
    d = np.stack([w * x for w, x in zip(weights, deltas)])
    ws = np.asarray(weights)[:, None, None] * np.ones_like(d)
    if consensus:
        mask = np.sign(d) == np.where(d.sum(0) >= 0, 1.0, -1.0)
        mixed, div = (d * mask).sum(0), (ws * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = d.sum(0), np.full(base.shape, float(np.sum(weights)))
    return base + lam * (mixed / div if normalize else mixed)


def _rescaled(d, m):
    return d * m * (np.abs(d).sum() / np.abs(d * m).sum())


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_formula(xs, method):
    base = xs["base"].numpy()
    deltas, n = [xs[k].numpy() - base for k in "ab"], base.size
    for rescale in (False, True):
        sparse = []
        for d, rho, gamma in zip(deltas, (0.5, 0.2), (0.05, 0.1)):
            order = np.argsort(np.abs(d).ravel(), kind="stable")  # ascending
            target, top = int(rho * n), int(gamma * n)
            bottom = max(0, n - target - top)
            m = np.zeros(n)
            m[order[bottom:bottom + target]] = 1
            m = m.reshape(d.shape)
            sparse.append(_rescaled(d, m) if rescale else d * m)
        want = _combine(base, sparse, [0.7, 0.4], method.endswith("ties"), 0.9, False)
        got = merge_tensor(method, xs["base"], [xs["a"], xs["b"]], weight=[0.7, 0.4], density=[0.5, 0.2], gamma=[0.05, 0.1],
                           lambda_=0.9, rescale=rescale)
        close(got, want)


def _documented_uniforms(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """docs/merge.md: rows cut in blocks of 2**20 elements, block j drawn with torch.rand from a generator seeded seed + j."""
    rows = max(1, DARE_BLOCK // math.prod(shape[1:]))
    return np.concatenate([torch.rand((min(rows, shape[0] - r), *shape[1:]), generator=torch.Generator().manual_seed(seed + j)).numpy()
                           for j, r in enumerate(range(0, shape[0], rows))]).astype(np.float64)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_formula_with_the_documented_seeded_draw(xs, method):
    base = xs["base"].numpy()
    seeds, rho, eps = [5, 6], [0.4, 0.6], [0.1, 0.2]
    sparse = []
    for k, s, r, e in zip("ab", seeds, rho, eps):
        d = xs[k].numpy() - base
        ranks = np.argsort(np.argsort(np.abs(d), axis=1, kind="stable"), axis=1, kind="stable")
        p = r - e + 2 * e * ranks / (d.shape[1] - 1)  # DELLA: keep probability rises with the magnitude rank in its row
        m = (_documented_uniforms(d.shape, s) < p).astype(np.float64)
        sparse.append(_rescaled(d, m))
    consensus, normalize = method == "della", method == "della"
    want = _combine(base, sparse, [0.6, 0.5], consensus, 1.0, normalize)
    got = merge_tensor(method, xs["base"], [xs["a"], xs["b"]], seeds, weight=[0.6, 0.5], density=rho, epsilon=eps)
    close(got, want)
    with pytest.raises(Exception, match="density \\+/- epsilon"):
        merge_tensor(method, xs["base"], [xs["a"]], weight=[1.0], density=[0.1], epsilon=[0.15])


@pytest.mark.parametrize("c_kernels", [True, False])
@pytest.mark.parametrize("shape, levels", [((40, 97), 7), ((3, 24, 33), 4), ((500,), 1000), ((1,), 3), ((6, 1), 3)])
def test_della_mask_matches_the_stable_rank_formula_with_many_ties(monkeypatch, shape, levels, c_kernels):
    """DELLA's keep mask (fused.sparse_mask, C and torch) against the ranks of a stable argsort along the last dimension,
    on magnitudes drawn from a few levels (so most entries are tied, zeros included) and on a fused [E, R, C] tensor;
    with the float64 sums of |d| and of the kept |d|."""
    from deltakit.engine import fused

    if not c_kernels:
        monkeypatch.setattr(fused, "native", lambda: None)
    g = torch.Generator().manual_seed(levels)
    x = (torch.randint(0, levels, shape, generator=g).float() / levels).mul_(torch.randint(0, 2, shape, generator=g) * 2 - 1)
    base = torch.zeros(shape)
    u = torch.rand(shape, generator=g)
    rows = x.abs().numpy().reshape(-1, shape[-1]).astype(np.float64)
    m = rows.shape[1]
    ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable")
    for density, epsilon in [(0.4, 0.1), (0.5, 0.45), (0.2, 0.15)]:
        p = density - epsilon + 2 * epsilon * ranks / max(m - 1, 1)
        want = u.numpy().reshape(rows.shape).astype(np.float64) < p
        bits, before, after = fused.sparse_mask(x, base, u, density, epsilon=epsilon, row=m)
        got = fused.unpack(bits, x.numel()).numpy().reshape(rows.shape)
        assert (got == want).all(), (shape, density, epsilon)
        assert before == pytest.approx(rows.sum(), rel=1e-12) and after == pytest.approx(rows[want].sum(), rel=1e-12)


def test_ties_with_rescale_formula(xs):
    base = xs["base"].numpy()
    sparse = []
    for k, rho in zip("ab", (0.5, 0.2)):
        d = xs[k].numpy() - base
        m = np.zeros(d.size)
        m[np.argsort(-np.abs(d).ravel(), kind="stable")[:max(1, int(rho * d.size))]] = 1
        sparse.append(_rescaled(d, m.reshape(d.shape)))
    got = merge_tensor("ties", xs["base"], [xs["a"], xs["b"]], weight=[0.7, 0.4], density=[0.5, 0.2], rescale=True)
    close(got, _combine(base, sparse, [0.7, 0.4], True, 1.0, True))


# -- configuration ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    ({"merge_method": "slerp", "base_model": "A", "models": ["A", "B"]}, "needs the parameter 't'"),
    ({"merge_method": "slerp", "base_model": "A", "models": ["B", "C"], "parameters": {"t": 0.5}}, "takes exactly 1 model"),
    ({"merge_method": "nuslerp", "models": [{"model": "A", "parameters": {"weight": 1}}], }, "takes exactly 2 model"),
    ({"merge_method": "model_stock", "base_model": "A", "models": ["B"]}, "takes at least 2 model"),
    ({"merge_method": "della", "base_model": "A", "models": [{"model": "B", "parameters": {"weight": 1, "epsilon": 1.5}}]},
     "epsilon must be in"),
    ({"merge_method": "karcher", "models": ["A", "B"], "parameters": {"max_iter": 0}}, "max_iter must be a positive integer"),
    ({"merge_method": "sce", "base_model": "A", "models": ["B"], "parameters": {"select_topk": 0}}, "select_topk must be in"),
    ({"merge_method": "nearswap", "base_model": "A", "models": ["B"], "parameters": {"t": 0.1, "weight": 1}}, "unknown parameter 'weight'"),
])
def test_bad_method_configs_are_one_line_errors(config, message):
    with pytest.raises(MergeConfigError, match=message):
        MergeConfig.from_dict(config)


# -- every method through the engine, on a tiny Qwen2.5-VL, loaded and run on an image --------------------------
@pytest.fixture(scope="module")
def vl_pair(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("methods")
    vl = save_tiny("qwen2_5_vl", root / "vl", layers=4)
    return {"root": str(root), "vl": str(vl), "llm": str(save_partner_llm(vl, root / "llm", noise=0.3, seed=1)),
            "base": str(save_partner_llm(vl, root / "base", noise=0.1, seed=2))}


def _recipe(method: str, p: dict[str, str]) -> dict:
    vl, llm, base = p["vl"], p["llm"], p["base"]
    weighted = [{"model": vl, "parameters": {"weight": 0.6}}, {"model": llm, "parameters": {"weight": 0.4}}]
    gta = {"base_model": base, "models": weighted, "parameters": {"density": 0.5}}
    return {"merge_method": method, "mllm": vl, "seed": 7} | {
        "linear": {"models": weighted},
        "layer_swap": {"models": weighted, "parameters": {"keep_layers": 2}},
        "task_arithmetic": {"base_model": base, "models": weighted},
        "ties": gta, "dare_linear": gta, "dare_ties": gta, "breadcrumbs": gta, "breadcrumbs_ties": gta,
        "della": {**gta, "parameters": {"density": 0.5, "epsilon": 0.1}},
        "della_linear": {**gta, "parameters": {"density": 0.5, "epsilon": 0.1}},
        "slerp": {"base_model": vl, "models": [vl, llm], "parameters": {"t": [0.2, 0.8]}},
        "nuslerp": {"models": weighted},
        "multislerp": {"base_model": base, "models": weighted},
        "karcher": {"models": [vl, llm]},
        "model_stock": {"base_model": base, "models": [vl, llm]},
        "nearswap": {"base_model": vl, "models": [vl, llm], "parameters": {"t": 0.01}},
        "sce": {"base_model": base, "models": [vl, llm], "parameters": {"select_topk": 0.5}},
    }[method]


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_every_method_streams_like_the_whole_tensor_formula_and_the_merged_vl_runs_on_an_image(vl_pair):
    """Blocks of 512 elements (16 rows of 32 here) make every statistic of a matrix a multi-block scan; each merged tensor must equal
    the whole-tensor formula with the parameters the report says were used (gradients and seeds resolved)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    root = Path(vl_pair["root"])
    inputs = {k: _load(Path(vl_pair[k])) for k in ("vl", "llm", "base")}
    paths = {vl_pair[k]: k for k in ("vl", "llm", "base")}
    image = SPECIAL["image"]
    ids = torch.tensor([[SPECIAL["im_start"], 17, SPECIAL["vision_start"], image, image, image, image,
                         SPECIAL["vision_end"], 42, 99, SPECIAL["im_end"]]])
    pixels = torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(vl_pair["vl"]).eval()
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]])).logits
    assert sorted(METHODS) == sorted(["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                      "breadcrumbs_ties", "della", "della_linear", "layer_swap", "slerp", "nuslerp",
                                      "multislerp", "karcher", "model_stock", "nearswap", "sce"])
    for method in METHODS:
        config = MergeConfig.from_dict(_recipe(method, vl_pair))
        out = root / method
        merge(config, out, block_elements=512, threads=2)
        got = _load(out)
        report = json.loads((out / "merge_report.json").read_text())
        nonbase = [paths[m.model] for m in config.non_base]
        merged = 0
        for t in report["tensors"]:
            k = t["key"]
            if t["action"] == "copied":
                assert torch.equal(got[k], inputs["vl"][k]), (method, k)
                continue
            merged += 1
            p = dict(t["params"])
            seeds = p.pop("seeds", [])
            base = inputs["base" if config.base_model and config.base_model.model == vl_pair["base"] else "vl"][k] \
                if config.uses_base else None
            want = merge_tensor(method, base, [inputs[n][k] for n in nonbase], seeds, **p)
            torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{method} {k}: {m}")
        assert merged == 12 * 4 + 1, method
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
        torch.testing.assert_close(model.model.language_model.layers[3].mlp.down_proj.weight.detach(), got["model.layers.3.mlp.down_proj.weight"])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]])).logits
        assert logits.shape == (1, ids.shape[1], 512) and torch.isfinite(logits).all(), method
        assert not torch.equal(logits, before), method  # the merged text tower is the one that ran


def test_cli_slerp_and_nearswap_of_the_common_case(vl_pair, tmp_path):
    """`--method slerp --alpha A`: base the MLLM, t = 1 - A (the LLM's share); nearswap takes `--t`."""
    from deltakit.cli import main

    vl, llm = _load(Path(vl_pair["vl"])), _load(Path(vl_pair["llm"]))
    k = "model.layers.1.self_attn.o_proj.weight"
    for method, flags, want in (("slerp", ["--alpha", "0.7"], lambda: merge_tensor("slerp", vl[k], [llm[k]], t=0.3)),
                                ("nearswap", ["--t", "0.02"], lambda: merge_tensor("nearswap", vl[k], [llm[k]], t=0.02))):
        out = tmp_path / method
        main(["merge", "--mllm", vl_pair["vl"], "--llm", vl_pair["llm"], "--method", method, *flags, str(out)])
        torch.testing.assert_close(_load(out)[k], want(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory) -> dict[str, str]:
    """:func:`vl_pair`'s three checkpoints stored in bf16 (a merge computes in float32 and keeps blocks in bf16)."""
    root = tmp_path_factory.mktemp("methods-bf16")
    vl = save_tiny("qwen2_5_vl", root / "vl", layers=4, dtype=torch.bfloat16)
    return {"root": str(root), "vl": str(vl),
            "llm": str(save_partner_llm(vl, root / "llm", noise=0.3, seed=1, dtype=torch.bfloat16)),
            "base": str(save_partner_llm(vl, root / "base", noise=0.1, seed=2, dtype=torch.bfloat16))}


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["slerp", "model_stock", "della"])
def test_blocks_kept_between_passes_are_read_once_and_merge_as_the_formula(request, tmp_path, monkeypatch, method, stored):
    """A two-pass method (statistic, then rows) reads the blocks that fit ``keep_bytes`` once and the others twice;
    every merged tensor still equals the whole-tensor formula. bf16 inputs are kept as stored: a block costs half."""
    from deltakit.io.reader import RowReader

    vl_pair = request.getfixturevalue("vl_pair" if stored == "float32" else "bf16_pair")
    config = MergeConfig.from_dict(_recipe(method, vl_pair))
    inputs = {k: _load(Path(vl_pair[k])) for k in ("vl", "llm", "base")}
    paths = {vl_pair[k]: k for k in ("vl", "llm", "base")}
    pread = RowReader._pread
    read: list[int] = []
    monkeypatch.setattr(RowReader, "_pread", lambda self, file, out, offset: (read.append(out.numel() * out.element_size()),
                                                                             pread(self, file, out, offset))[1])
    totals = {}
    reads = len(config.non_base) + 1  # the models and the base, each read in full once per pass
    one = 2 * reads * 512 * 4  # one block of every float32 input per thread
    for keep in (0, one, 1 << 30):
        read.clear()
        out = tmp_path / f"{method}-{keep}"
        merge(config, out, block_elements=512, threads=2, keep_bytes=keep)
        totals[keep] = sum(read)
        got = _load(out)
        for t in json.loads((out / "merge_report.json").read_text())["tensors"]:
            if t["action"] != "copied":
                p = dict(t["params"])
                seeds = p.pop("seeds", [])
                base = inputs["base" if config.base_model.model == vl_pair["base"] else "vl"][t["key"]]
                sources = [inputs[paths[m.model]][t["key"]].float() for m in config.non_base]
                want = merge_tensor(method, base.float(), sources, seeds, **p).to(got[t["key"]].dtype)
                torch.testing.assert_close(got[t["key"]], want, **({"rtol": 1e-6, "atol": 1e-6} if stored == "float32" else {}))
    merged = sum(inputs["vl"][t["key"]].numel() * inputs["vl"][t["key"]].element_size()
                 for t in json.loads((tmp_path / f"{method}-0" / "merge_report.json").read_text())["tensors"] if t["action"] != "copied")
    assert totals[0] - totals[1 << 30] == merged * reads  # the second pass read nothing again
    assert totals[1 << 30] < totals[one] < totals[0]


EXACT = ("linear", "task_arithmetic", "nearswap", "dare_linear", "dare_ties", "della", "della_linear", "ties", "breadcrumbs_ties")


@pytest.mark.parametrize("method", [*EXACT, "slerp", "nuslerp", "multislerp", "karcher", "model_stock"])
def test_the_c_kernels_merge_as_the_torch_operations(bf16_pair, tmp_path, monkeypatch, method):
    """bf16 checkpoints merged in float32: a fused method's kernels get their inputs as stored (deltakit.engine.fused);
    with the C kernels switched off the same merge runs as torch operations on float32 inputs. Weighted sums, nearswap and
    the sparsified sums (TIES and Breadcrumbs get float32 inputs both times: their top-k scans are torch operations) agree
    bit for bit; a method with a Gram scan within one bf16 rounding (float64 products there, chunked float32 sums here)."""
    from deltakit.engine import fused
    from deltakit.merge import run

    config = MergeConfig.from_dict(_recipe(method, bf16_pair))
    stored = []
    choose = run._stored
    monkeypatch.setattr(run, "_stored", lambda job, block: (stored.append(choose(job, block)), stored[-1])[1])
    merge(config, tmp_path / "c", block_elements=512, threads=2)
    kept = {None} if method in ("ties", "breadcrumbs_ties") else {torch.bfloat16}
    assert stored and set(stored) == kept  # every merged block of a fused method went to the C kernels unconverted
    stored.clear()
    with monkeypatch.context() as m:
        m.setattr(fused, "native", lambda: None)
        merge(config, tmp_path / "torch", block_elements=512, threads=2)
    assert stored and set(stored) == {None}
    c, t = _load(tmp_path / "c"), _load(tmp_path / "torch")
    assert c.keys() == t.keys()
    differ = sum(int((c[k] != t[k]).sum()) for k in c)
    if method in EXACT:
        assert differ == 0
    else:
        assert differ <= 1e-3 * sum(x.numel() for x in c.values()), differ
        for k in c:
            torch.testing.assert_close(c[k].float(), t[k].float(), rtol=2 ** -7, atol=1e-6, msg=lambda m: f"{k}: {m}")
