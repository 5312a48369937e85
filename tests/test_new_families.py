"""The 2025-26 families end to end on tiny sharded checkpoints saved by transformers: diff, merge, prior, finetune.

Every reference is computed from the models as transformers loads them (its own load-time renames,
expert fusing and transposing), with the MLLM-to-LLM name correspondence written out here: text tower
``model.language_model.*`` in the MLLM, ``model.*`` in the LLM, mllama's layer i of the LLM at index
``i + (cross-attention layers before it)``, expert j of a fused ``gate_up_proj`` [E, 2I, H] at ``[j, :I]``
(gate) and ``[j, I:]`` (up).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import transformers
import yaml

from deltakit.diagnostics import diff
from deltakit.drift import DriftBias
from deltakit.merge import MergeConfig, merge
from deltakit.prior import Prior, export_prior
from deltakit.tiny import save_partner_llm, save_tiny

MLLMS = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "internvl", "gemma3", "llava_onevision", "mistral3", "mllama")
TEXT = "model.language_model."
VISION = ("model.visual.", "model.vision_tower.", "model.vision_model.", "model.multi_modal_projector.", "model.image_newline")
PRIOR_RE = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj\.(weight|bias)|mlp\.(gate|up|down)_proj\.weight|"
                      r"mlp\.experts\.(gate_up|down)_proj|linear_attn\.(in_proj_(qkv|z|a|b)|out_proj)\.weight)$")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    made = {}

    def make(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            vl = save_tiny(family, root / "vl", seed=0, max_shard_size="40KB")
            llm = save_partner_llm(vl, root / "llm", noise=0.5, seed=3, max_shard_size="40KB")
            made[family] = (vl, llm)
        return made[family]
    return make


def load(folder):
    cfg = json.loads((folder / "config.json").read_text())
    model = getattr(transformers, cfg["architectures"][0]).from_pretrained(folder, dtype=torch.float32)
    return model, {n: p.detach().double() for n, p in model.state_dict().items()}


def cross_layers(vl_config: dict) -> list[int]:
    return sorted((vl_config.get("text_config") or {}).get("cross_attention_layers") or [])


def paired(vl_state: dict, llm_state: dict, cross: list[int]) -> dict[str, tuple[str, str]]:
    """MLLM in-memory text name -> (its LLM in-memory name, canonical-ish layer key) for every shared tensor."""
    out = {}
    for name in vl_state:
        if name == "lm_head.weight":
            if name in llm_state:
                out[name] = (name, None)
            continue
        if not name.startswith(TEXT):
            continue
        rest = name[len(TEXT):]
        m = re.match(r"layers\.(\d+)\.(.*)", rest)
        layer = None
        if m:
            i = int(m.group(1))
            if i in cross:
                continue
            layer = i - sum(c < i for c in cross)
            rest = f"layers.{layer}.{m.group(2)}"
        if "model." + rest in llm_state:
            out[name] = ("model." + rest, layer)
    return out


def _cos(pairs_):
    dot = sum(float((a * b).sum()) for a, b in pairs_)
    na = math.sqrt(sum(float(a.square().sum()) for a, _ in pairs_))
    nb = math.sqrt(sum(float(b.square().sum()) for _, b in pairs_))
    return dot / (na * nb)


@pytest.mark.parametrize("family", MLLMS)
def test_detected_diffed_per_layer_and_expert(pairs, family):
    vl, llm = pairs(family)
    report = diff(vl, llm)
    assert (report.family_a, report.family_b) == (family, json.loads((llm / "config.json").read_text())["model_type"])
    _, a = load(vl)
    _, b = load(llm)
    cross = cross_layers(json.loads((vl / "config.json").read_text()))
    names = paired(a, b, cross)
    layers: dict[int, list] = {}
    for n, (m, layer) in names.items():
        if layer is not None:
            layers.setdefault(layer, []).append((a[n], b[m]))
    assert sorted(report.layers) == sorted(layers)
    for i, ts in layers.items():
        assert report.layers[i].cosine == pytest.approx(_cos(ts), rel=1e-6, abs=1e-9)
    embed = [(a[n], b[m][: a[n].shape[0]]) if a[n].shape != b[m].shape else (a[n], b[m]) for n, (m, _) in names.items()]
    if all(x.shape == y.shape for x, y in embed):
        assert report.overall.cosine == pytest.approx(_cos(embed), rel=1e-6)
    fused = [n for n in a if n.endswith("mlp.experts.gate_up_proj")]
    if fused:  # per expert: gate, up (rows of gate_up) and down of expert j against the LLM's expert j
        n = fused[0]
        m, layer = names[n]
        down_a, down_b = a[n.replace("gate_up_proj", "down_proj")], b[m.replace("gate_up_proj", "down_proj")]
        for j in range(a[n].shape[0]):
            want = _cos([(a[n][j], b[m][j]), (down_a[j], down_b[j])])
            assert report.experts[(layer, j)].cosine == pytest.approx(want, rel=1e-6)
    if cross:
        assert any(t.startswith("cross_layers.") for t in report.only_a) and not report.only_b
    assert not report.shape_mismatch


@pytest.mark.parametrize("family", MLLMS)
def test_linear_merge_reloads_as_the_formula(pairs, family, tmp_path):
    vl, llm = pairs(family)
    cfg = MergeConfig.from_dict({"merge_method": "linear", "models": [{"model": str(vl), "parameters": {"weight": 0.7}},
                                                                       {"model": str(llm), "parameters": {"weight": 0.3}}]})
    merge(cfg, tmp_path / "out")
    _, a = load(vl)
    _, b = load(llm)
    _, out = load(tmp_path / "out")
    cross = cross_layers(json.loads((vl / "config.json").read_text()))
    names = paired(a, b, cross)
    assert set(out) == set(a)
    merged = 0
    for n in a:
        m, layer = names.get(n, (None, None))
        if m is not None and (layer is not None or n == TEXT + "norm.weight"):  # paired layers and the final norm
            torch.testing.assert_close(out[n], 0.7 * a[n] + 0.3 * b[m], rtol=1e-6, atol=1e-6)
            merged += 1
        else:  # vision, projector, embeddings, lm_head, mllama's cross-attention layers
            assert torch.equal(out[n], a[n]), n
    assert merged == sum(1 for _, layer in names.values() if layer is not None) + 1


@pytest.mark.parametrize("family", MLLMS)
def test_prior_binds_in_memory_as_llm_minus_mllm(pairs, family, tmp_path):
    vl, llm = pairs(family)
    export_prior(vl, llm, tmp_path / "prior.safetensors", dtype="float32")
    model, a = load(vl)
    _, b = load(llm)
    names = paired(a, b, cross_layers(json.loads((vl / "config.json").read_text())))
    bias = DriftBias.bind(model, Prior.open(tmp_path / "prior.safetensors"))
    got = {t.name: t for t in bias.targets}
    want = {n for n, (m, layer) in names.items() if layer is not None and PRIOR_RE.search(n[len(TEXT):])}
    assert set(got) == want
    for n, t in got.items():
        assert all(c is not None for c in t.canonicals)  # every expert has its D
        torch.testing.assert_close(t.prior.double(), b[names[n][0]] - a[n], rtol=0, atol=1e-6)


def test_qwen3_vl_moe_in_its_published_transposed_layout(pairs, tmp_path):
    """Qwen3-VL-MoE's Hub checkpoints store experts as [E, H, 2I] / [E, I, H]; transformers transposes them on load."""
    from safetensors.torch import load_file, save_file

    vl, llm = pairs("qwen3_vl_moe")
    published = tmp_path / "published"
    published.mkdir()
    for f in vl.iterdir():
        if f.suffix == ".safetensors":
            tensors = {k: (v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v) for k, v in load_file(f).items()}
            save_file(tensors, published / f.name, metadata={"format": "pt"})
        else:
            (published / f.name).write_bytes(f.read_bytes())
    _, a = load(vl)
    _, t = load(published)  # transformers' own reading of the transposed layout: the same model
    assert all(torch.equal(a[n], t[n]) for n in a)
    assert diff(published, llm).to_dict()["layers"] == diff(vl, llm).to_dict()["layers"]
    cfg = MergeConfig.from_dict({"merge_method": "linear", "models": [{"model": str(published), "parameters": {"weight": 0.7}},
                                                                       {"model": str(llm), "parameters": {"weight": 0.3}}]})
    merge(cfg, tmp_path / "out")
    on_disk = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        on_disk.update({k: v.shape for k, v in load_file(f).items()})
    gate_up = next(k for k in on_disk if k.endswith("experts.gate_up_proj"))
    assert on_disk[gate_up] == load(published)[0].state_dict()[gate_up].transpose(1, 2).shape  # the MLLM's own layout
    _, b = load(llm)
    _, out = load(tmp_path / "out")
    names = paired(a, b, [])
    torch.testing.assert_close(out[gate_up], 0.7 * a[gate_up] + 0.3 * b[names[gate_up][0]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["fused", "published"])
def test_ties_trims_each_fused_expert_tensor_as_one_tensor(pairs, layout, tmp_path):
    """TIES of one LLM onto the MLLM as base, density 0.5: each stored tensor keeps its exact top half of |delta|
    (mergekit's count int(0.5 n)), whether the MLLM's experts are fused in memory layout or transposed."""
    from safetensors.torch import load_file, save_file

    vl, llm = pairs("qwen3_vl_moe")
    if layout == "published":
        src, vl = vl, tmp_path / "published"
        vl.mkdir()
        for f in src.iterdir():
            if f.suffix == ".safetensors":
                save_file({k: (v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v) for k, v in load_file(f).items()},
                          vl / f.name, metadata={"format": "pt"})
            else:
                (vl / f.name).write_bytes(f.read_bytes())
    cfg = MergeConfig.from_dict({"merge_method": "ties", "base_model": {"model": str(vl)}, "mllm": str(vl),
                                 "models": [{"model": str(llm), "parameters": {"weight": 1.0, "density": 0.5}}]})
    merge(cfg, tmp_path / "out")
    _, a = load(vl)
    _, b = load(llm)
    _, out = load(tmp_path / "out")
    names = paired(a, b, [])
    for n in (k for k in a if k.endswith(("experts.gate_up_proj", "experts.down_proj"))):
        delta = (b[names[n][0]] - a[n]).float()
        k = int(0.5 * delta.numel())
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        keep[delta.abs().flatten().topk(k).indices] = True
        want = a[n].float() + delta * keep.reshape(delta.shape)
        torch.testing.assert_close(out[n].float(), want, rtol=1e-6, atol=1e-7)


def test_expert_counts_must_agree(pairs, tmp_path):
    """4 experts against 3: the lineage check names it from the configs; without configs the pairing does."""
    from safetensors.torch import load_file, save_file

    from deltakit.errors import IncompatibleError

    vl, llm = pairs("qwen3_vl_moe")
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    config = json.loads((llm / "config.json").read_text())
    config["num_experts"] = 3
    (fewer / "config.json").write_text(json.dumps(config))
    tensors = {}
    for f in llm.glob("*.safetensors"):
        tensors.update({k: v for k, v in load_file(f).items() if ".mlp.experts.3." not in k})
    tensors = {k: (v[:3] if k.endswith("mlp.gate.weight") else v) for k, v in tensors.items()}
    save_file(tensors, fewer / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompatibleError, match="cannot share a base model: experts 4 vs 3"):
        diff(vl, fewer)
    (fewer / "config.json").write_text('{"model_type": "qwen3_moe"}')
    with pytest.raises(IncompatibleError, match=r"layer 0 has 4 experts in .* but 3 in .*fewer"):
        diff(vl, fewer)
