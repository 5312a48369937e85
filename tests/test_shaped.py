"""analyses/shaped.py: shape-faithful random checkpoints of real configs, and partners with a known perturbation.

Keys and shapes are checked against independent references: transformers' own ``save_pretrained`` of
a tiny model of each shrunk config, the published checkpoints' total sizes, and the on-disk keys of
KEYMAP-transformers-5.24.json. Tiny pairs are really written, opened by deltakit and loaded by transformers.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analyses import shaped  # noqa: E402
from deltakit.io.checkpoint import Checkpoint  # noqa: E402
from deltakit.model import open_model  # noqa: E402

CONFIGS = ROOT / "tests" / "data" / "model-configs"
VL7, VL3 = "Qwen__Qwen2.5-VL-7B-Instruct", "Qwen__Qwen2.5-VL-3B-Instruct"
R1, Q3 = "deepseek-ai__DeepSeek-R1-Distill-Qwen-7B", "Qwen__Qwen2.5-3B"
ALL = sorted(p.name for p in CONFIGS.iterdir() if (p / "config.json").exists())
# Published sizes (bytes of model.safetensors.index.json "total_size"; bf16, so 2 bytes a parameter):
PUBLISHED = {
    # 16,584,333,312: a Qwen2.5-VL-7B re-save checked against it (`assert total_size == 16584333312`, public
    # training script) and Qwen-Image's text encoder (= Qwen2.5-VL-7B) storage size; 8,292,166,656 params on the Hub.
    VL7: (16_584_333_312, None),
    # 15,231,233,024: Qwen2.5-7B-Instruct's index (same shapes as R1-Distill-Qwen-7B: 3584/28/18944, vocab 152064,
    # untied), quoted with its Hub URL in public notes; the brief's "~15.23 GB".
    R1: (15_231_233_024, None),
    "Qwen__Qwen2.5-7B-Instruct": (15_231_233_024, None),
    # 6,171,877,376 and 434 weight-map entries: Qwen2.5-3B-Instruct's index (same shapes as Qwen2.5-3B, tied).
    Q3: (6_171_877_376, 434),
    # 3,754,622,976 params (MTEB model metadata, Hub revision 2c2962d) x 2 bytes; 824 tensors in a public delta manifest.
    VL3: (7_509_245_952, 824),
    # SOURCES.md: 750 tensors, 8,767,123,696 params (verbatim model-inspector dump).
    "Qwen__Qwen3-VL-8B-Instruct": (2 * 8_767_123_696, 750),
}


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    ckpt = Checkpoint.open(folder)
    return {k: ckpt.meta(k).shape for k in ckpt.keys()}


@functools.lru_cache(maxsize=None)
def _full_plan(name: str) -> tuple:
    """The plan of a published config at full size (meta device only), shared by the tests."""
    return tuple(shaped.plan(name))


def _tiny(name: str, **kw) -> dict:
    return shaped.shrink(shaped.load_config(name), **{**shaped.TINY, **kw})


def _model_class(config: dict) -> type:
    return getattr(transformers, config["architectures"][0])


# -- keys and shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_plan_equals_what_transformers_saves_for_a_tiny_model(name, tmp_path):
    config = _tiny(name, vocab=1000)
    torch.manual_seed(0)
    _model_class(config)(shaped.hf_config(config)).save_pretrained(tmp_path)
    assert {s.name: s.shape for s in shaped.plan(config, layout="fresh")} == _shapes(tmp_path)
    published = {s.name: s.shape for s in shaped.plan(config)}
    if name.startswith(("llava-hf__", "google__gemma-3-4b", "google__gemma-3-12b")):
        # published LLaVA-Next / Gemma-3 checkpoints keep CLIP/SigLIP's vision_model prefix; a fresh save drops it
        assert any(k.startswith("vision_tower.vision_model.") for k in published)
        published = {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in published.items()}
    if name.startswith("Qwen__Qwen3-VL-30B"):
        # published Qwen3-VL-MoE experts are [E, H, 2I] / [E, I, H] (SOURCES.md); a fresh save keeps memory's layout
        assert all(v[1:] == _shapes(tmp_path)[k][:0:-1] for k, v in published.items() if ".mlp.experts." in k)
        published = {k: (v[0], v[2], v[1]) if ".mlp.experts." in k else v for k, v in published.items()}
    assert published == _shapes(tmp_path)


def test_qwen_vl_layout_and_ties():
    keys = [s.name for s in _full_plan(VL7)]
    assert {k.split(".")[0] for k in keys} == {"model", "visual", "lm_head"}
    assert "model.layers.27.mlp.down_proj.weight" in keys and "visual.blocks.31.attn.qkv.weight" in keys
    assert not any(k.startswith("model.language_model") or k.startswith("model.visual") for k in keys)
    llm = {s.name: s for s in _full_plan(R1)}
    assert {k for k in llm if not k.startswith("model.layers.")} == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert llm["model.layers.0.self_attn.k_proj.weight"].shape == (512, 3584)
    assert {s.dtype for s in llm.values()} == {torch.bfloat16}
    assert not any("lm_head" in s.name for s in _full_plan(VL3))  # tied: no lm_head on disk


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_plan_matches_published_size(name):
    specs = _full_plan(name)
    size, count = PUBLISHED[name]
    total = sum(s.nbytes for s in specs)
    assert abs(total - size) / size < 0.01, (total, size)
    if count is not None:
        assert len(specs) == count


def test_plan_agrees_with_transformers_keymap():
    """KEYMAP gives, for on-disk keys of published checkpoints, the in-memory name transformers 5.24 loads
    them as. Every in-memory name is built; every renamed (published) disk key is planned verbatim, except
    bare base-model keys (``layers.0...``, loaded by adding ``model.``) and lm_heads of configs that tie by
    default (SOURCES.md's InternVL / Mistral3 caveat). Four text layers and one vision layer keep every key KEYMAP names.
    """
    keymap = json.loads((CONFIGS / "KEYMAP-transformers-5.24.json").read_text())
    for name, entries in keymap.items():
        config = shaped.shrink(shaped.load_config(name), layers=4, vision_layers=1)
        keys = {s.name for s in shaped.plan(config)}
        memory = set(shaped.meta_model(config).state_dict())
        cfg = shaped.hf_config(config)
        tied = any(getattr(c, "tie_word_embeddings", False) for c in (cfg, cfg.get_text_config()))
        for disk, (mem, _, real) in entries.items():
            if not real:
                continue
            assert mem in memory, (name, mem)
            if disk != mem and mem != "model." + disk and not (tied and mem == "lm_head.weight"):
                assert disk in keys, (name, disk)
    # MoE: one tensor per expert on disk, fused in memory.
    keys = {s.name: s.shape for s in shaped.plan(shaped.shrink(shaped.load_config("Qwen__Qwen3-30B-A3B"), layers=1))}
    assert keys["model.layers.0.mlp.experts.127.gate_proj.weight"] == (768, 2048)
    assert not any("gate_up_proj" in k for k in keys)


def test_shrink_keeps_key_names():
    full = {re.sub(r"\.\d+\.", ".N.", s.name) for s in _full_plan(VL7)}
    small = {re.sub(r"\.\d+\.", ".N.", s.name) for s in shaped.plan(_tiny(VL7))}
    assert small == full
    cfg = shaped.hf_config(_tiny(VL7))
    assert cfg.text_config.num_hidden_layers == 2 and cfg.vision_config.depth == 2
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == 64 // 4 // 2
    for name in (VL7, "mistralai__Mistral-Small-3.1-24B-Instruct-2503"):  # the latter: head_dim 128 != 5120 / 32
        full = {s.name: s.shape for s in _full_plan(name)}
        fewer = {s.name: s.shape for s in shaped.plan(shaped.shrink(shaped.load_config(name), layers=3, vision_layers=3))}
        assert fewer.items() <= full.items() and len(fewer) < len(full)


# -- written checkpoints ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shaped")
    first = shaped.write_checkpoint(_tiny(VL7), root / "vl", max_shard_bytes=8_000_000)
    partner = shaped.write_partner(first, _tiny(R1), root / "r1", noise=1.0, seed=1, max_shard_bytes=8_000_000)
    return first, partner


def test_shards_and_index_are_consistent(pair):
    for folder in pair:
        config = json.loads((folder / "config.json").read_text())
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        specs = shaped.plan(config)
        files = sorted(set(index["weight_map"].values()))
        n = len(files)
        assert n >= 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert sorted(p.name for p in folder.glob("*.safetensors")) == files
        assert list(index["weight_map"]) == [s.name for s in specs]
        assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
        ckpt = Checkpoint.open(folder)
        on_disk = {k: (ckpt.meta(k).dtype, ckpt.meta(k).shape) for k in ckpt.keys()}
        assert on_disk == {s.name: (s.dtype, s.shape) for s in specs}
        for f in files:
            held = [s for s in specs if index["weight_map"][s.name] == f]
            assert len(held) == 1 or sum(s.nbytes for s in held) <= 8_000_000
            assert all(Path(ckpt.meta(s.name).file).name == f for s in held)
    assert not list(pair[0].parent.glob(".*"))  # no temporary leftovers


def test_transformers_loads_both_without_missing_keys(pair):
    for folder in pair:
        config = json.loads((folder / "config.json").read_text())
        model, info = _model_class(config).from_pretrained(folder, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert next(model.parameters()).dtype == torch.bfloat16


def test_random_values_are_sane_and_seeded(pair, tmp_path):
    m = open_model(pair[0])
    assert m.family.name == "qwen2_5_vl" and m.num_layers == 2 and not m.tied
    w = m.get("layers.0.mlp.down_proj.weight").float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    norm = m.get("norm.weight").float()
    assert abs(norm.mean().item() - 1) < 0.02
    again = shaped.write_checkpoint(_tiny(VL7), tmp_path / "again", max_shard_bytes=8_000_000)
    key = m.text["embed_tokens.weight"].key
    assert torch.equal(Checkpoint.open(again).get(key), m.ckpt.get(key))


def test_partner_is_first_plus_the_stated_perturbation(pair):
    a, b = open_model(pair[0]), open_model(pair[1])
    assert b.family.name == "qwen2" and set(b.text) == set(a.text)
    expected = 1 / math.sqrt(2)
    num = den = 0.0
    for canonical in b.text:
        x, y = a.get(canonical).double(), b.get(canonical).double()
        cos = float(torch.dot(x.flatten(), y.flatten()) / (x.norm() * y.norm()))
        assert abs(cos - expected) < 0.01 + 4 / math.sqrt(x.numel()), canonical
        num, den = num + float((y - x).square().sum()), den + float(x.square().sum())
    assert abs(math.sqrt(num / den) - 1.0) < 0.01  # |delta| / |A| = noise over the whole tower
    # exactly the seeded noise: A + noise * rms(A) * N(0, 1) from the key's generator, rounded to bf16
    key = "model.layers.1.mlp.up_proj.weight"
    x = a.ckpt.get(key).float()
    rms = math.sqrt(float(x.square().sum()) / x.numel())
    z = torch.empty_like(x).normal_(0.0, rms, generator=shaped._generator(1, key, 0))
    assert torch.equal((x + z).to(torch.bfloat16), b.ckpt.get(key))


def test_output_does_not_depend_on_threads_or_chunking_order(tmp_path, monkeypatch):
    monkeypatch.setattr(shaped, "CHUNK", 4096)  # many row chunks per tensor, run out of order on 3 threads
    config = _tiny(R1, vocab=1000)
    one = shaped.write_checkpoint(config, tmp_path / "one", workers=1, max_shard_bytes=100_000)
    three = shaped.write_checkpoint(config, tmp_path / "three", workers=3, max_shard_bytes=100_000)
    files = sorted(p.name for p in one.glob("*.safetensors"))
    assert len(files) > 2 and all((one / f).read_bytes() == (three / f).read_bytes() for f in files)
    partner = open_model(shaped.write_partner(one, config, tmp_path / "partner", noise=0.5, workers=3))
    a = open_model(one)
    x, y = a.ckpt.get("model.embed_tokens.weight").double(), partner.ckpt.get("model.embed_tokens.weight").double()
    assert abs(float((y - x).norm() / x.norm()) - 0.5) < 0.01


def test_partner_across_vocab_sizes_and_ties(tmp_path):
    """A tied first (Qwen2.5-VL-3B, vocab 1000) and an untied partner with a larger vocabulary (1200)."""
    first = shaped.write_checkpoint(_tiny(VL3, vocab=1000), tmp_path / "a")
    noise = shaped.noise_for_cosine(0.99)
    partner = shaped.write_partner(first, _tiny(R1, vocab=1200), tmp_path / "b", noise=noise)
    a, b = open_model(first), open_model(partner)
    assert a.tied and not b.tied
    embed = a.get("embed_tokens.weight").double()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        y = b.ckpt.get(key).double()
        assert y.shape == (1200, 64)
        shared = y[:1000]
        cos = float(torch.dot(embed.flatten(), shared.flatten()) / (embed.norm() * shared.norm()))
        assert abs(cos - 0.99) < 0.003
        assert abs(y[1000:].std().item() - 0.02) < 0.002  # rows past the shared vocabulary: fresh random
    smaller = shaped.write_partner(partner, _tiny(VL3, vocab=1000), tmp_path / "c", noise=0.5)
    assert open_model(smaller).ckpt.meta("model.embed_tokens.weight").shape == (1000, 64)


def test_partner_rejects_mismatched_shapes(pair, tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        shaped.write_partner(pair[0], _tiny(R1, hidden=96), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".*"))


def test_cli(tmp_path, capsys):
    out, out2 = tmp_path / "a", tmp_path / "b"
    shaped.main([Q3, str(out), "--partner", R1, str(out2), "--tiny", "--cosine", "0.9", "--shard-gb", "0.005"])
    printed = capsys.readouterr().out
    assert "first:" in printed and "partner (noise 0.484)" in printed and "GB/s" in printed
    assert open_model(out2).family.name == "qwen2" and len(open_model(out).ckpt.files()) >= 2
