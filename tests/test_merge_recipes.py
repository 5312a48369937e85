"""The shipped merge recipes (commands/merge-*.yaml) parse, and plan against the real models' shapes.

No weights exist here, so each model named in a recipe whose published config.json is in
tests/data/model-configs/ becomes a header-only checkpoint: the keys and shapes transformers builds from
that config on the meta device, in a sparse safetensors file (nothing but the header is ever read).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from deltakit.families import tie_word_embeddings
from deltakit.io.format import build_header
from deltakit.merge import MergeConfig
from deltakit.merge.plan import plan_merge

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "commands").glob("merge-*.yaml"))
CONFIGS = {p.name.split("__", 1)[1]: p for p in (ROOT / "tests" / "data" / "model-configs").iterdir() if "__" in p.name}


def header_only(config_dir: Path, out: Path) -> Path:
    """A model folder with the config and a sparse safetensors file holding only the header (bf16 tensors)."""
    config = json.loads((config_dir / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        model = cls(transformers.AutoConfig.from_pretrained(config_dir))
    tied = tie_word_embeddings(config)
    specs = [(k, torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()
             if not (tied and k.endswith("lm_head.weight"))]
    header, _ = build_header(specs, {"format": "pt"})
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    with open(out / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(torch.Size(s).numel() * 2 for _, _, s in specs))
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
            layers = plan.mllm.num_layers
            assert len(merged) == layers * (12 if plan.mllm.family.name.startswith("qwen") else 9) + 1, recipe.name
            assert all(j.rows == j.shape[0] for j in merged)  # no vocab tensor merged by default
            assert {plan.mllm.infos[j.key].role for j in plan.jobs if not j.merged} >= {"vision", "text"}
            if config.merge_method == "layer_swap":
                for j in merged:
                    layer = plan.mllm.infos[j.key].layer
                    assert j.params["weight"] == ([1.0, 0.0] if layer is not None and layer < 5 else [0.9, 0.1])
        finally:
            plan.close()
    assert {"merge-br2v-qwen2.5-vl-7b-r1.yaml", "merge-layerswap-qwen2.5-vl-7b-r1.yaml",
            "merge-ties-idefics2-metamath.yaml"} <= set(planned)
