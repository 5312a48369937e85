"""Tiny checkpoints of the families added to deltakit.tiny: they save sharded, reload with transformers,
map to canonical names as built, and their partner LLMs hold exactly the MLLM's text tower at noise 0."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from deltakit.families import get_family
from deltakit.model import map_parameters, open_model, part_of
from deltakit.tiny import SPECIAL, VOCAB, build_tiny, save_partner_llm, save_tiny, tiny_config

NEW = ["qwen3", "qwen3_moe", "qwen3_5_text", "qwen3_5_moe_text", "gemma3_text", "qwen3_vl", "qwen3_vl_moe", "qwen3_5",
       "qwen3_5_moe", "llava_onevision", "internvl", "gemma3", "mistral3", "mllama"]
MULTIMODAL = [f for f in NEW if get_family(f).multimodal] + ["qwen2_vl", "qwen2_5_vl", "llava", "llava_next",
                                                             "idefics2", "idefics3"]
MOE = ["qwen3_moe", "qwen3_vl_moe", "qwen3_5_moe", "qwen3_5_moe_text"]
SEED = 3


def _text(config) -> transformers.PretrainedConfig:
    return config.get_text_config(decoder=True)


def _cls(family: str):
    return getattr(transformers, get_family(family).architectures[0])


def _paired(mapped) -> list[str]:
    return [c for c in mapped.text if not c.startswith("cross_layers.")]


@pytest.mark.parametrize("family", NEW)
def test_save_sharded_reload_and_detect(family, tmp_path):
    folder = save_tiny(family, tmp_path / "m", seed=SEED, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    built = build_tiny(family, SEED).state_dict()
    loaded = _cls(family).from_pretrained(folder).state_dict()
    assert built.keys() == loaded.keys()
    for k in built:
        assert torch.equal(built[k], loaded[k]), k
    assert open_model(folder).family.name == family


@pytest.mark.parametrize("family", NEW)
def test_disk_canonical_tensors_are_the_models(family, tmp_path):
    """open_model(folder).get(c) is the built model's canonical tensor c, for every c on either side."""
    folder = save_tiny(family, tmp_path / "m", seed=SEED, max_shard_size="40KB")
    model = build_tiny(family, SEED)
    fam, infos, parts = map_parameters(model)
    assert fam.name == family
    params = dict(model.named_parameters())
    disk = open_model(folder)
    assert set(disk.text) | ({"lm_head.weight"} if disk.tied else set()) >= set(parts)
    assert set(parts) | ({"lm_head.weight"} if disk.tied else set()) >= set(disk.text)
    for c, part in parts.items():
        mem = part_of(params[part.key].data, part)
        got = disk.get(c)
        assert tuple(got.shape) == tuple(mem.shape), (c, disk.resolve(c), tuple(mem.shape))
        assert torch.equal(got, mem), c


def test_tiny_config_specifics():
    for family in MOE:
        text = _text(tiny_config(family))
        experts = getattr(text, "num_experts", None) or text.num_local_experts
        assert (experts, text.num_experts_per_tok) == (4, 2)
        assert 2 * text.moe_intermediate_size != text.hidden_size != text.moe_intermediate_size
    assert _text(tiny_config("qwen3_5_moe")).shared_expert_intermediate_size > 0
    for family in ("qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text"):
        assert set(_text(tiny_config(family)).layer_types) == {"linear_attention", "full_attention"}
    assert set(_text(tiny_config("gemma3")).layer_types) == {"sliding_attention", "full_attention"}
    mllama = _text(tiny_config("mllama"))
    assert (mllama.num_hidden_layers, mllama.cross_attention_layers, mllama.vocab_size) == (5, [1, 3], VOCAB)
    model = build_tiny("mllama")
    assert model.model.language_model.embed_tokens.weight.shape[0] == VOCAB + 8
    assert model.lm_head.weight.shape[0] == VOCAB
    for family in NEW:
        config = tiny_config(family)
        ids = {k: v for section in (config.to_dict(), _text(config).to_dict()) for k, v in section.items()
               if (k.endswith("_token_id") or k.endswith("_token_index")) and isinstance(v, int)}
        rows = VOCAB + 8 if family == "mllama" else VOCAB
        assert all(0 <= v < rows for v in ids.values()), (family, ids)
    assert tiny_config("gemma3").image_token_index == SPECIAL["image"]


def _check_partner(mllm_folder, partner_folder):
    src, llm = open_model(mllm_folder), open_model(partner_folder)
    fam = src.family
    assert llm.family.name == fam.text_type
    assert llm.num_layers == src.num_layers
    assert not llm.cross
    assert llm.tied == src.tied
    paired = _paired(src)
    have = set(llm.text) | ({"lm_head.weight"} if llm.tied else set())
    assert set(paired) - have == set()
    assert have - set(paired) - {"lm_head.weight"} == set()
    for c in paired:
        a, b = src.get(c), llm.get(c)
        if c == "embed_tokens.weight" and fam.name == "mllama":
            assert a.shape[0] == b.shape[0] + 8
            a = a[:b.shape[0]]
        assert a.shape == b.shape and torch.equal(a, b), c
    # the partner is a valid transformers model whose text config matches the MLLM's tower
    model = _cls(fam.text_type).from_pretrained(partner_folder)
    mt, lt = _text(transformers.AutoConfig.from_pretrained(mllm_folder)), model.config
    assert lt.num_hidden_layers == src.num_layers
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "moe_intermediate_size",
                  "num_experts_per_tok", "shared_expert_intermediate_size", "rms_norm_eps", "layer_types",
                  "linear_key_head_dim", "linear_num_value_heads", "sliding_window", "vocab_size"):
        want = getattr(mt, field, None)
        if field == "layer_types" and want is not None:
            want = [t for i, t in enumerate(want) if i not in src.cross]
        if want is not None:
            assert getattr(lt, field, None) == want, field
    assert model.config.rope_parameters.get("rope_theta") == mt.rope_parameters.get("rope_theta")
    return src, llm


@pytest.mark.parametrize("family", MULTIMODAL)
def test_partner_llm_at_noise_zero_is_the_text_tower(family, tmp_path):
    mllm = save_tiny(family, tmp_path / "m", seed=SEED, max_shard_size="40KB")
    llm = save_partner_llm(mllm, tmp_path / "llm", noise=0.0, max_shard_size="40KB")
    _check_partner(mllm, llm)


@pytest.mark.parametrize("family", ["gemma3", "qwen3_vl", "internvl"])
def test_tied_partner(family, tmp_path):
    mllm = save_tiny(family, tmp_path / "m", seed=SEED, tie=True)
    src, llm = _check_partner(mllm, save_partner_llm(mllm, tmp_path / "llm", noise=0.0))
    assert src.tied and llm.tied and "lm_head.weight" not in llm.text


def test_partner_noise_scale(tmp_path):
    mllm = save_tiny("qwen3_5_moe", tmp_path / "m", seed=SEED)
    llm = save_partner_llm(mllm, tmp_path / "llm", noise=0.1, seed=5)
    src, dst = open_model(mllm), open_model(llm)
    z = []
    for c in _paired(src):
        a, b = src.get(c).float(), dst.get(c).float()
        scale = a.std() if a.numel() > 1 and a.std() > 1e-6 else torch.tensor(1.0)
        assert not torch.equal(a, b), c
        z.append(((b - a) / scale).flatten())
    z = torch.cat(z)
    assert abs(z.std().item() - 0.1) < 0.005 and abs(z.mean().item()) < 0.005


def test_qwen3_vl_moe_hub_layout(tmp_path):
    """Hub Qwen3-VL-MoE checkpoints store experts transposed ([E, H, 2I], [E, I, H]); transformers loads both."""
    folder = save_tiny("qwen3_vl_moe", tmp_path / "m", seed=SEED, max_shard_size="40KB")
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        tensors = {k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
                   for k, v in tensors.items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    built = build_tiny("qwen3_vl_moe", SEED).state_dict()
    loaded = _cls("qwen3_vl_moe").from_pretrained(folder).state_dict()
    assert all(torch.equal(built[k], loaded[k]) for k in built)
    model = build_tiny("qwen3_vl_moe", SEED)
    _, _, parts = map_parameters(model)
    params = dict(model.named_parameters())
    disk = open_model(folder)
    for c, part in parts.items():
        assert torch.equal(disk.get(c), part_of(params[part.key].data, part)), c
    _check_partner(folder, save_partner_llm(folder, tmp_path / "llm", noise=0.0))
