"""deltakit merge against mergekit 0.1.5 (run in-process) on the same tiny LLM checkpoints.

Both compute in float32 on float32 checkpoints, so tensors agree to float32 rounding. Every tensor is
compared (``modules`` lists all groups, since mergekit merges embeddings, norms and lm_head too). DARE is
not compared: mergekit draws its mask from the global torch RNG and rescales to match the L1 norm,
deltakit draws a per-tensor seeded mask and rescales by 1/density (see docs/merge.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltakit.merge import MergeConfig, merge
from deltakit.tiny import save_partner_llm, save_tiny

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

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


@pytest.mark.parametrize("name", list(CASES))
def test_agrees_with_mergekit(llms, name):
    mk, dk = _both(llms, name, CASES[name](llms))
    assert set(mk) == set(dk) and len(dk) == 4 * 12 + 3
    base = _load(Path(llms["base"]))
    for k in dk:
        torch.testing.assert_close(dk[k], mk[k], atol=2e-6, rtol=1e-5, msg=lambda m: f"{name} {k}: {m}")
        if name != "linear":
            assert not torch.equal(dk[k], base[k]), k  # something was merged in every tensor
