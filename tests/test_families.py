"""Family mapping: every family on tiny sharded checkpoints, key coverage of the 12 real configs, detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers.core_model_loading import revert_weight_conversion

from deltakit.cli import main
from deltakit.families import FAMILY_NAMES, classify_key, detect_family
from deltakit.model import map_parameters, open_model

CONFIGS = Path(__file__).parent / "data" / "model-configs"
TEXT_TYPE = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "llava": "llama", "llava_next": "mistral",
             "idefics2": "mistral", "idefics3": "llama"}
PROJECTOR_WORD = {"qwen2_vl": "merger", "qwen2_5_vl": "merger", "llava": "multi_modal_projector",
                  "llava_next": "multi_modal_projector", "idefics2": "connector", "idefics3": "connector"}
LAYER_KINDS = {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "norm"}
EXPECTED_FAMILY = {
    "HuggingFaceM4__idefics2-8b": "idefics2",
    "Qwen__Qwen2-Math-7B": "qwen2",
    "Qwen__Qwen2-VL-7B-Instruct": "qwen2_vl",
    "Qwen__Qwen2.5-3B": "qwen2",
    "Qwen__Qwen2.5-7B-Instruct": "qwen2",
    "Qwen__Qwen2.5-VL-3B-Instruct": "qwen2_5_vl",
    "Qwen__Qwen2.5-VL-7B-Instruct": "qwen2_5_vl",
    "deepseek-ai__DeepSeek-R1-Distill-Qwen-7B": "qwen2",
    "llava-hf__llama3-llava-next-8b-hf": "llava_next",
    "llava-hf__llava-v1.6-mistral-7b-hf": "llava_next",
    "meta-math__MetaMath-Mistral-7B": "mistral",
    "mistralai__Mistral-7B-v0.1": "mistral",
}


def _text_reference(config: dict, family: str) -> set[str]:
    """Canonical names from a standalone transformers CausalLM with the same text sizes (lm_head dropped if tied)."""
    text = dict(config.get("text_config") or config)
    text_type = TEXT_TYPE.get(family, family)
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
    cfg = transformers.AutoConfig.for_model(text_type, **{k: text[k] for k in keep})
    with torch.device("meta"):
        lm = transformers.AutoModelForCausalLM.from_config(cfg)
    names = {n.removeprefix("model.") for n in lm.state_dict()}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return names - {"lm_head.weight"} if tied else names


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_on_tiny_sharded_checkpoint(tiny_checkpoint, family):
    folder = tiny_checkpoint(family, layers=3, max_shard_size="40KB")
    config = json.loads((folder / "config.json").read_text())
    m = open_model(folder)
    assert m.family.name == family
    assert len(m.ckpt.files()) >= 2
    assert set(m.text) == _text_reference(config, family)
    assert m.num_layers == 3
    for i in range(3):
        kinds = {m.infos[k].kind for c, k in m.text.items() if c.startswith(f"layers.{i}.")}
        assert kinds == LAYER_KINDS
    roles = {k: i.role for k, i in m.infos.items()}
    assert "other" not in roles.values(), [k for k, r in roles.items() if r == "other"]
    if family in PROJECTOR_WORD:
        projector = [k for k, r in roles.items() if r == "projector"]
        assert projector and all(PROJECTOR_WORD[family] in k or "image_newline" in k for k in projector)
        assert any(r == "vision" for r in roles.values())
    else:
        assert set(roles.values()) == {"text"}


def test_tied_embeddings_resolve_to_embed(tiny_checkpoint):
    m = open_model(tiny_checkpoint("qwen2_5_vl", tie=True))
    assert m.tied and "lm_head.weight" not in m.text
    assert not any("lm_head" in k for k in m.ckpt.keys())
    assert m.resolve("lm_head.weight") == m.text["embed_tokens.weight"]


def _meta_model(folder: Path) -> tuple[dict, transformers.PretrainedConfig, torch.nn.Module]:
    raw = json.loads((folder / "config.json").read_text())
    cfg = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = getattr(transformers, raw["architectures"][0])(cfg)
    return raw, cfg, model


def _expected_text_params(raw: dict, cfg: transformers.PretrainedConfig) -> int:
    """Text-tower parameter count from the config's sizes (Qwen2 has q/k/v biases; lm_head only when untied)."""
    t = cfg.get_text_config()
    h, inter, layers, vocab, heads = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size, t.num_attention_heads
    kv = t.num_key_value_heads
    hd = getattr(t, "head_dim", None) or h // heads
    bias = raw["model_type"].startswith("qwen2")
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + (heads * hd + 2 * kv * hd if bias else 0)
    per_layer = attn + 3 * h * inter + 2 * h
    tied = raw.get("tie_word_embeddings", (raw.get("text_config") or {}).get("tie_word_embeddings", False))
    return vocab * h * (1 if tied else 2) + h + layers * per_layer


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILY))
def test_real_config_detection_and_key_coverage(name):
    raw, cfg, model = _meta_model(CONFIGS / name)
    fam = detect_family(raw)
    assert fam.name == EXPECTED_FAMILY[name]
    n_layers = cfg.get_text_config().num_hidden_layers
    # in-memory parameter names (what finetune binds to)
    _, infos, text = map_parameters(model, fam)
    params = dict(model.named_parameters())
    assert sum(params[k].numel() for k in text.values()) == _expected_text_params(raw, cfg)
    assert all(i.role != "other" for i in infos.values()), [k for k, i in infos.items() if i.role == "other"][:3]
    layers = {i.layer for i in infos.values() if i.layer is not None}
    assert layers == set(range(n_layers))
    # on-disk key names (what save_pretrained writes)
    disk = revert_weight_conversion(model, dict(model.state_dict()))
    disk_infos = {k: classify_key(k, fam) for k in disk}
    assert all(i.role != "other" for i in disk_infos.values()), [k for k, i in disk_infos.items() if i.role == "other"][:3]
    disk_text = {i.canonical for i in disk_infos.values() if i.role == "text"}
    assert disk_text >= set(text) and disk_text - set(text) <= {"lm_head.weight"}
    for i in range(n_layers):
        assert {d.kind for d in disk_infos.values() if d.layer == i} == LAYER_KINDS
    has_vision = any(i.role in ("vision", "projector") for i in disk_infos.values())
    assert has_vision == fam.multimodal


def test_detection_from_keys_and_family_override(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("qwen2_5_vl")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in src.glob("*.safetensors"):
        (bare / f.name).symlink_to(f)
    (bare / "config.json").write_text("{}")
    m = open_model(bare)
    assert m.family.layout == open_model(src).family.layout
    assert set(m.text) == set(open_model(src).text)

    llm = tiny_checkpoint("qwen2")
    out = tmp_path / "r.json"
    main(["diff", str(llm), str(llm), "--family-a", "llama", "--json", str(out)])
    report = json.loads(out.read_text())
    assert (report["a"]["family"], report["b"]["family"]) == ("llama", "qwen2")
    assert report["summary"]["median_layer_cosine"] == pytest.approx(1.0)

    for flag, msg in (("idefics2", "no text-tower layer"), ("gpt9", "unknown family 'gpt9'")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["diff", str(llm), str(llm), "--family-b", flag])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and "Traceback" not in err
