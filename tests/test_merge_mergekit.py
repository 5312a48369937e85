"""deltakit merge against mergekit 0.1.5 (run in-process) on the same tiny LLM checkpoints.

Both compute in float32 on float32 checkpoints. Every tensor is compared (``modules`` lists all groups,
since mergekit merges embeddings, norms and lm_head too):

- ``linear`` (normalized: the divisor is the float32 sum of the float32 weights, as mergekit's, also where it
  is not the rounded float64 sum: layer 2's MLP, 0.4333... + 0.4), ``task_arithmetic``, ``ties`` (normalized
  or not, with ``rescale``), ``breadcrumbs``, ``breadcrumbs_ties``, ``nearswap``, ``model_stock`` with
  ``filter_wise``: bit for bit. These float32 deltas have no entry tied at a top-k threshold (checked for
  ties), the only place the magnitude trims may pick differently.
- ``slerp`` (a per-layer ``t`` gradient), ``nuslerp`` (flattened, per row, per column, with and without a
  base), ``multislerp`` (with and without a base), ``karcher``, ``model_stock``, ``sce``: within
  :data:`ATOL` = 4e-7 (measured at most 2.4e-7: nuslerp, multislerp, karcher, model_stock; 2 float32 ulps at 1, a
  hundredth of a bf16 ulp).
  Their whole-tensor statistics (norms, dot products, Gram matrices, mean squares) are float64 sums
  here and float32 reductions there; the coefficients computed from them differ in the last float32 bits.

DARE and DELLA cannot match entry for entry: mergekit draws ``torch.bernoulli`` from the global torch RNG
in its task order, deltakit draws seeded per-tensor blocks (reproducible whatever the threads). They are
shown statistically equivalent instead (:func:`test_random_methods_are_statistically_equivalent`): both
keep the expected fraction of entries (DELLA: per magnitude-rank bin of each row), both rescale every kept
entry by one per-tensor factor that restores the delta's L1 norm, and both merged deltas are unbiased
for the same expected sum.

mergekit is a dev dependency (``pip install -e ".[dev]"``) and is imported plainly: a missing or broken
install fails this module instead of skipping it. Importing it needs no workaround (mergekit 0.1.5 with
this torch and transformers; under ``-W error`` only numpy's ``numpy.core`` DeprecationWarning shows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deltakit.merge import MergeConfig, merge
from deltakit.tiny import save_partner_llm, save_tiny

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

ALL = ["attn", "mlp", "norm", "embed", "lm_head"]


@pytest.fixture(scope="module")
def llms(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mk")
    base = save_tiny("qwen2", root / "base", layers=4)
    return {"root": str(root), "base": str(base),
            "a": str(save_partner_llm(base, root / "a", noise=0.3, seed=1)),
            "b": str(save_partner_llm(base, root / "b", noise=0.3, seed=2)),
            "c": str(save_partner_llm(base, root / "c", noise=0.3, seed=3))}


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _both(llms: dict[str, str], name: str, config: dict) -> tuple[dict, dict]:
    root = Path(llms["root"])
    torch.manual_seed(0)  # mergekit's random drops use the global RNG
    run_merge(MergeConfiguration.model_validate({**config, "dtype": "float32"}), str(root / f"mk_{name}"),
              MergeOptions(copy_tokenizer=False, lazy_unpickle=True))
    merge(MergeConfig.from_dict({**config, "modules": ALL}), root / f"dk_{name}")
    return _load(root / f"mk_{name}"), _load(root / f"dk_{name}")


def _models(llms, a_params: dict, b_params: dict) -> list[dict]:
    return [{"model": llms["a"], "parameters": a_params}, {"model": llms["b"], "parameters": b_params}]


CASES = {
    "linear": lambda m: {"merge_method": "linear",
                         "models": _models(m, {"weight": [{"filter": "mlp", "value": [0.9, 0.2]}, {"value": 0.7}]},
                                           {"weight": 0.4})},
    "task_arithmetic": lambda m: {"merge_method": "task_arithmetic", "base_model": m["base"],
                                  "models": _models(m, {"weight": [1.0, 0.3, 0.8]}, {"weight": 0.5}),
                                  "parameters": {"lambda": 0.8}},
    "ties": lambda m: {"merge_method": "ties", "base_model": m["base"],
                       "models": _models(m, {"weight": 0.7, "density": 0.5}, {"weight": 0.4, "density": 0.2}),
                       "parameters": {"lambda": 0.9}},
    "ties_unnormalized": lambda m: {"merge_method": "ties", "base_model": m["base"],
                                    "models": _models(m, {"weight": 1.0}, {"weight": 1.0}),
                                    "parameters": {"density": 0.3, "normalize": False}},
}


def _ties_at_threshold(llms, config: dict) -> int:
    """Entries equal to the k-th largest |delta| beyond the k-th itself, over every model and tensor."""
    base = _load(Path(llms["base"]))
    n = 0
    for m in config["models"]:
        density = m["parameters"].get("density", config.get("parameters", {}).get("density"))
        for k, x in _load(Path(m["model"])).items():
            a = (x - base[k]).abs().reshape(-1)
            t = torch.kthvalue(a, a.numel() - max(1, int(density * a.numel())) + 1).values
            n += int((a == t).sum()) - 1
    return n


@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_mergekit(llms, name):
    config = CASES[name](llms)
    mk, dk = _both(llms, name, config)
    assert set(dk) == set(mk) and len(dk) == 4 * 12 + 3
    base = _load(Path(llms["base"]))
    if name == "linear":  # layer 2 of 4: the mlp weight gradient [0.9, 0.2] at t = 2/3, whose float32 sum is not the rounded one
        a, b = 0.9 + (0.2 - 0.9) * 2 / 3, 0.4
        assert torch.tensor(a + b, dtype=torch.float32) != torch.tensor(a, dtype=torch.float32) + torch.tensor(b, dtype=torch.float32)
    if name.startswith("ties"):
        assert _ties_at_threshold(llms, config) == 0
    for k in dk:
        assert torch.equal(dk[k].view(torch.int32), mk[k].view(torch.int32)), (
            f"{name} {k}: max abs diff {float((dk[k] - mk[k]).abs().max())}")
        assert not torch.equal(dk[k], base[k]), k  # something was merged in every tensor


# -- the methods whose statistics are float64 sums here and float32 reductions in mergekit ---------------------
ATOL = 4e-7


def _w(m, *entries) -> list[dict]:
    return [{"model": m[k], "parameters": p} if p else {"model": m[k]} for k, p in entries]


def _pair_ab(m) -> list[dict]:
    return _w(m, ("a", {"weight": 0.3}), ("b", {"weight": 0.7}))


CLOSE = {
    "slerp": lambda m: {"merge_method": "slerp", "base_model": m["a"], "models": _w(m, ("a", {}), ("b", {})),
                        "parameters": {"t": [0.1, 0.6, 0.9]}},
    "nuslerp": lambda m: {"merge_method": "nuslerp", "models": _pair_ab(m)},
    "nuslerp_base": lambda m: {"merge_method": "nuslerp", "base_model": m["base"], "models": _pair_ab(m)},
    "nuslerp_rows": lambda m: {"merge_method": "nuslerp", "models": _pair_ab(m), "parameters": {"nuslerp_flatten": False}},
    "nuslerp_columns": lambda m: {"merge_method": "nuslerp", "base_model": m["base"], "models": _pair_ab(m),
                                  "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "multislerp": lambda m: {"merge_method": "multislerp",
                             "models": _w(m, ("a", {"weight": 0.5}), ("b", {"weight": 0.3}), ("c", {"weight": 0.2}))},
    "multislerp_base": lambda m: {"merge_method": "multislerp", "base_model": m["base"],
                                  "models": _w(m, ("a", {"weight": 0.5}), ("b", {"weight": 0.3}), ("c", {"weight": 0.2}))},
    "karcher": lambda m: {"merge_method": "karcher", "models": _w(m, ("a", {}), ("b", {}), ("c", {}))},
    "model_stock": lambda m: {"merge_method": "model_stock", "base_model": m["base"], "models": _w(m, ("a", {}), ("b", {}), ("c", {}))},
    "sce": lambda m: {"merge_method": "sce", "base_model": m["base"], "models": _w(m, ("a", {}), ("b", {}), ("c", {})),
                      "parameters": {"select_topk": 0.3}},
    "sce_all": lambda m: {"merge_method": "sce", "base_model": m["base"], "models": _w(m, ("a", {}), ("b", {}))},
}
EXACT = {
    "ties_rescale": lambda m: {"merge_method": "ties", "base_model": m["base"], "parameters": {"rescale": True},
                               "models": _w(m, ("a", {"weight": 0.7, "density": 0.5}), ("b", {"weight": 0.4, "density": 0.2}))},
    "breadcrumbs": lambda m: {"merge_method": "breadcrumbs", "base_model": m["base"], "parameters": {"gamma": 0.05},
                              "models": _w(m, ("a", {"weight": 0.7, "density": 0.5}), ("b", {"weight": 0.4, "density": 0.3}))},
    "breadcrumbs_ties": lambda m: {"merge_method": "breadcrumbs_ties", "base_model": m["base"],
                                   "parameters": {"gamma": 0.05, "rescale": True},
                                   "models": _w(m, ("a", {"weight": 0.7, "density": 0.5}), ("b", {"weight": 0.4, "density": 0.3}))},
    "nearswap": lambda m: {"merge_method": "nearswap", "base_model": m["a"], "models": _w(m, ("a", {}), ("b", {})),
                           "parameters": {"t": 0.05}},
    "model_stock_filter_wise": lambda m: {"merge_method": "model_stock", "base_model": m["base"],
                                          "models": _w(m, ("a", {}), ("b", {})), "parameters": {"filter_wise": True}},
}


@pytest.mark.parametrize("name", list(CLOSE) + list(EXACT))
def test_more_methods_agree_with_mergekit(llms, name):
    mk, dk = _both(llms, name, (CLOSE | EXACT)[name](llms))
    assert set(dk) == set(mk) and len(dk) == 4 * 12 + 3
    base = _load(Path(llms["base"]))
    for k in dk:
        if name in EXACT:
            assert torch.equal(dk[k].view(torch.int32), mk[k].view(torch.int32)), (
                f"{name} {k}: max abs diff {float((dk[k] - mk[k]).abs().max())}")
        else:
            torch.testing.assert_close(dk[k], mk[k], rtol=0, atol=ATOL, msg=lambda msg: f"{name} {k}: {msg}")
        assert not torch.equal(dk[k], base[k]), k  # something was merged in every tensor
    if name in CLOSE:  # the comparison is not vacuous: the method moved every tensor well beyond ATOL
        assert min(float((dk[k] - base[k]).abs().max()) for k in dk) > 30 * ATOL


# -- DARE and DELLA: statistically equivalent ------------------------------------------------------------------
def _della_probabilities(d: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of each entry, from its magnitude rank within its row (numpy, stable order)."""
    a = np.abs(d.numpy().reshape(1, -1) if d.dim() < 2 else d.numpy())
    ranks = np.argsort(np.argsort(a, axis=1, kind="stable"), axis=1, kind="stable")
    p = density - epsilon + 2 * epsilon * ranks / max(a.shape[1] - 1, 1)
    return torch.from_numpy(p.reshape(d.shape))


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_methods_are_statistically_equivalent(llms, method):
    """One model, weight 1: each tool's merged delta ``m * d * c`` is a random keep-mask ``m`` of ``d = a - base``
    times one rescale factor ``c`` per tensor. For both tools: ``c`` restores the L1 norm exactly; the keep rate
    is the density (DELLA: the rank-dependent probability, in four rank bins) within 5 binomial standard
    deviations; the merged delta's sum is within 5 standard deviations of its expectation ``c sum d_i p_i``."""
    density, epsilon = 0.3, 0.15
    params = {"density": density} | ({"epsilon": epsilon} if method == "della_linear" else {})
    config = {"merge_method": method, "base_model": llms["base"], "models": _w(llms, ("a", {"weight": 1.0})), "parameters": params}
    outputs = dict(zip(("mergekit", "deltakit"), _both(llms, method, config)))
    base, a = _load(Path(llms["base"])), _load(Path(llms["a"]))
    for tool, out in outputs.items():
        kept, expected, bins, rates = 0, 0.0, np.zeros(4), np.zeros((4, 2))
        for k in out:
            d = (a[k] - base[k]).double()
            got = out[k].double() - base[k].double()
            m = got != 0
            p = _della_probabilities(d, density, epsilon) if method == "della_linear" else torch.full_like(d, density)
            c = float(d.abs().sum() / (d * m).abs().sum())
            torch.testing.assert_close(got, d * m * c, rtol=3e-6, atol=1e-7, msg=lambda msg: f"{tool} {k}: {msg}")
            assert abs(float(got.abs().sum()) / float(d.abs().sum()) - 1) < 1e-5  # L1 restored
            z = (float(got.sum()) - c * float((d * p).sum())) / (c * float((d.square() * p * (1 - p)).sum()) ** 0.5)
            assert abs(z) < 5, f"{tool} {k}: merged delta's sum {z:.1f} standard deviations from its expectation"
            kept += int(m.sum())
            expected += float(p.sum())
            if d.dim() == 2:
                b = (torch.argsort(torch.argsort(d.abs(), dim=1), dim=1) * 4 // d.shape[1]).reshape(-1).numpy()
                np.add.at(rates, (b, 0), m.reshape(-1).numpy())
                np.add.at(rates, (b, 1), p.reshape(-1).numpy())
                np.add.at(bins, b, 1)
        n = sum(t.numel() for t in out.values())
        assert abs(kept - expected) < 5 * (expected * (1 - expected / n)) ** 0.5, (tool, kept / n, expected / n)
        sigma = (rates[:, 1] * (1 - rates[:, 1] / bins)) ** 0.5
        assert (np.abs(rates[:, 0] - rates[:, 1]) < 5 * sigma).all(), (tool, rates[:, 0] / bins, rates[:, 1] / bins)
        if method == "della_linear":  # the bins differ as DELLA's probabilities do: 0.15 ... 0.45
            assert rates[3, 1] / bins[3] - rates[0, 1] / bins[0] > 0.2
