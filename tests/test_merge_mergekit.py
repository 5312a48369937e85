"""deltakit merge against mergekit 0.1.5 (run in-process) on the same tiny LLM checkpoints.

Both compute in float32 on float32 checkpoints. Every tensor is compared (``modules`` lists all groups,
since mergekit merges embeddings, norms and lm_head too), bit for bit where the two agree to the bit:

- ``task_arithmetic`` and ``ties`` (normalized or not): bit for bit. These float32 deltas have no entry
  tied at the k-th magnitude (checked below), the only place TIES may pick differently (docs/merge.md).
- ``linear`` with ``normalize`` (its default): within 2 float32 ulps (1.4e-7 relative). deltakit divides
  by ``sum w_i`` taken in float64 and rounded once to float32; mergekit 0.1.5 sums the float32-rounded
  weights in float32. The two divisors differ in the last bit for some weights (here layer 2's MLP:
  0.4333... + 0.4), and then so do quotients (measured: 4783 of 70176 entries 1 ulp apart, 243 entries
  2 ulps, max abs diff 7.5e-9); tensors whose divisors agree are bit for bit.

DARE is not compared: mergekit draws its mask from the global torch RNG and rescales to match the L1
norm, deltakit draws a per-tensor seeded mask and rescales by 1/density (see docs/merge.md).

mergekit is a dev dependency (``pip install -e ".[dev]"``) and is imported plainly: a missing or broken
install fails this module instead of skipping it. Importing it needs no workaround (mergekit 0.1.5 with
this torch and transformers; under ``-W error`` only numpy's ``numpy.core`` DeprecationWarning shows).
"""

from __future__ import annotations

from pathlib import Path

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
            "b": str(save_partner_llm(base, root / "b", noise=0.3, seed=2))}


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _both(llms: dict[str, str], name: str, config: dict) -> tuple[dict, dict]:
    root = Path(llms["root"])
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


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between ``a`` and ``b`` in float32 units in the last place (same-sign entries)."""
    assert a.dtype == b.dtype == torch.float32
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


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
    if name == "linear":
        # Bit for bit where the float32 divisors agree; within 2 ulps elsewhere (module docstring).
        a, b = 0.9 + (0.2 - 0.9) * 2 / 3, 0.4  # layer 2 of 4: the mlp weight gradient [0.9, 0.2] at t = 2/3
        assert torch.tensor(a + b, dtype=torch.float32) != torch.tensor(a, dtype=torch.float32) + torch.tensor(b, dtype=torch.float32)
        differ = sorted(k for k in dk if not torch.equal(dk[k], mk[k]))
        assert differ and all(k.startswith("model.layers.2.mlp.") for k in differ), differ
        assert max(_ulps(dk[k], mk[k]) for k in dk) == 2
        for k in dk:
            torch.testing.assert_close(dk[k], mk[k], rtol=1.5e-7, atol=0, msg=lambda m: f"{k}: {m}")
        return
    if name.startswith("ties"):
        assert _ties_at_threshold(llms, config) == 0
    for k in dk:
        assert torch.equal(dk[k].view(torch.int32), mk[k].view(torch.int32)), (
            f"{name} {k}: max abs diff {float((dk[k] - mk[k]).abs().max())}")
        assert not torch.equal(dk[k], base[k]), k  # something was merged in every tensor
