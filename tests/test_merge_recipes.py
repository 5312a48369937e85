"""The shipped merge recipes (commands/merge-*.yaml) parse, and plan against the real models' shapes.

No weights exist here, so each model named in a recipe whose published config.json is in
tests/data/model-configs/ becomes a header-only checkpoint: the keys and shapes of its published
checkpoint (transformers' meta-device model, saved as transformers 5 re-saves the published files:
:func:`analyses.shaped.plan`), in a sparse safetensors file (nothing but the header is ever read).
The expected counts below are worked out by hand from each architecture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from deltakit.engine.selection import DEFAULT_MODULES, Selection
from deltakit.io.format import build_header
from deltakit.merge import MergeConfig
from deltakit.merge.plan import plan_merge
from deltakit.model import open_model
from deltakit.prior import plan_prior

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analyses"))
import shaped  # noqa: E402

RECIPES = sorted((ROOT / "commands").glob("merge-*.yaml"))
CONFIGS = {p.name.split("__", 1)[1]: p for p in (ROOT / "tests" / "data" / "model-configs").iterdir() if "__" in p.name}


def header_only(config_dir: Path, out: Path) -> Path:
    """A model folder with the config and a sparse safetensors file holding only the header (bf16 tensors)."""
    config = json.loads((config_dir / "config.json").read_text())
    specs = [(s.name, s.dtype, s.shape) for s in shaped.plan(config, torch.bfloat16)]
    header, _ = build_header(specs, {"format": "pt"})
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    with open(out / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in specs))
    return out


def _paths(data: dict) -> list[str]:
    entries = data["models"] + ([data["base_model"]] if "base_model" in data else [])
    return [e if isinstance(e, str) else e["model"] for e in entries]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    wanted = {Path(p).name for r in RECIPES for p in _paths(MergeConfig.from_yaml(r).to_dict())}
    return {name: header_only(CONFIGS[name], root / name) for name in sorted(wanted & set(CONFIGS))}


def test_every_recipe_parses_and_uses_placeholder_paths():
    assert len(RECIPES) >= 4
    for recipe in RECIPES:
        config = MergeConfig.from_yaml(recipe)
        assert all(p.startswith("models/") for p in _paths(config.to_dict())), recipe.name
        assert config.mllm is not None, recipe.name


def _localized(recipe: Path, shapes: dict[str, Path]) -> MergeConfig | None:
    data = MergeConfig.from_yaml(recipe).to_dict()
    if not all(Path(p).name in shapes for p in _paths(data)):
        return None
    text = recipe.read_text()
    for name, path in shapes.items():
        text = text.replace(f"models/{name}", str(path))
    return MergeConfig.from_dict(yaml.safe_load(text))


# Merged tensors per paired decoder layer under each recipe's modules, and the layers: q,k,v,o (+3 biases
# for Qwen2 towers), 3 MLP weights or Qwen3-MoE's 2 fused expert tensors + router, 2 layer norms
# (+2 q/k norms for Qwen3), plus the final norm once.
MERGED = {
    "merge-br2v-qwen2.5-vl-7b-r1.yaml": 28 * (7 + 3 + 2) + 1,
    "merge-layerswap-qwen2.5-vl-7b-r1.yaml": 28 * (7 + 3 + 2) + 1,
    "merge-ties-idefics2-metamath.yaml": 32 * (4 + 3 + 2) + 1,
    "merge-br2v-qwen3-vl-8b-qwen3-8b.yaml": 36 * (4 + 3 + 2 + 2) + 1,
    "merge-br2v-qwen3-vl-30b-a3b-qwen3-30b-a3b.yaml": 48 * (4 + 2 + 1 + 2 + 2) + 1,
    "merge-br2v-internvl3-8b-r1.yaml": 28 * (7 + 3 + 2) + 1,
    "merge-br2v-llama-3.2-11b-vision-r1-llama.yaml": 32 * (4 + 3 + 2) + 1,
}


def test_recipes_plan_against_the_real_shapes(shapes):
    planned = {}
    for recipe in RECIPES:
        config = _localized(recipe, shapes)
        if config is None:
            continue
        plan = plan_merge(config)
        try:
            planned[recipe.name] = plan
            merged = [j for j in plan.jobs if j.merged]
            assert len(merged) == MERGED[recipe.name], recipe.name
            assert all(j.rows == j.shape[0] for j in merged)  # no vocab tensor merged by default
            assert {plan.mllm.infos[j.key].role for j in plan.jobs if not j.merged} >= {"vision", "text"}
            if config.merge_method == "layer_swap":
                for j in merged:
                    layer = plan.mllm.infos[j.key].layer
                    assert j.params["weight"] == ([1.0, 0.0] if layer is not None and layer < 5 else [0.9, 0.1])
            if plan.mllm.family.name == "mllama":  # the 8 cross-attention layers are copied, 13 tensors each
                cross = [j for j in plan.jobs if j.canonical and j.canonical.startswith("cross_layers.")]
                assert len(cross) == 8 * 13 and not any(j.merged for j in cross)
                assert {int(j.key.split(".layers.")[1].split(".")[0]) for j in cross} == {3, 8, 13, 18, 23, 28, 33, 38}
                j = next(j for j in merged if j.canonical == "layers.3.mlp.down_proj.weight")
                assert j.key == "language_model.model.layers.4.mlp.down_proj.weight"  # Llama layer 3 is MLLM layer 4
                assert j.sources[1][1].key == "model.layers.3.mlp.down_proj.weight"
            if plan.mllm.family.name == "qwen3_vl_moe":  # fused [128, 2048, 1536] rebuilt from 256 per-expert tensors
                j = next(j for j in merged if j.key.endswith("layers.0.mlp.experts.gate_up_proj"))
                assert j.shape == (128, 2048, 1536) and len(j.sources[1][1].pieces) == 256
                assert j.sources[1][1].pieces[0][1].key == "model.layers.0.mlp.experts.0.gate_proj.weight"
        finally:
            plan.close()
    assert set(planned) == set(MERGED)  # every recipe but LLaVA-Next's task arithmetic (no Meta-Llama-3-8B config here)


PRIORS = {  # prior tensors by default (attention weights and biases, MLP weights, one per expert)
    ("Qwen2.5-VL-7B-Instruct", "DeepSeek-R1-Distill-Qwen-7B"): 28 * (7 + 3),
    ("Qwen3-VL-8B-Instruct", "Qwen3-8B"): 36 * (4 + 3),
    ("Qwen3-VL-30B-A3B-Instruct", "Qwen3-30B-A3B"): 48 * (4 + 128 * 3),
    ("InternVL3-8B-hf", "DeepSeek-R1-Distill-Qwen-7B"): 28 * (7 + 3),
    ("Llama-3.2-11B-Vision", "DeepSeek-R1-Distill-Llama-8B"): 32 * (4 + 3),
}


@pytest.fixture(scope="module")
def prior_shapes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prior-shapes")
    return {name: header_only(CONFIGS[name], root / name) for name in sorted({n for pair in PRIORS for n in pair})}


@pytest.mark.parametrize("pair", sorted(PRIORS), ids="--".join)
def test_priors_of_the_recipe_pairs_plan_against_the_real_shapes(prior_shapes, pair):
    mllm, llm = (open_model(prior_shapes[n]) for n in pair)
    try:
        tensors, _ = plan_prior(mllm, llm, mllm, Selection.parse(DEFAULT_MODULES["prior"]), {}, torch.bfloat16, None)
        assert len(tensors) == PRIORS[pair]
        assert all(t.rows == t.shape[0] for t in tensors)
    finally:
        mllm.ckpt.close()
        llm.ckpt.close()
