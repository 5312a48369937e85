"""Family mapping.

- the nine original families on tiny sharded checkpoints (``tiny_checkpoint``): map_checkpoint end to end;
- every real ``config.json`` under tests/data/model-configs (25 models, copied from /work/shared/model-configs)
  built on the meta device: detection, in-memory names (``named_parameters``, what finetune binds to) and
  on-disk names (what ``save_pretrained`` writes: tied weights dropped, load-time conversions reverted,
  as ``analyses/shaped.py plan()`` does) all classified, per-kind counts and shapes derived here from the
  config, parameter counts, fused experts tiling their tensors, memory == disk canonical names and shapes,
  vision/projector keys;
- Qwen3.5 (no published config here): small synthetic configs for the linear-attention rules;
- the paper's pairings: every attention and MLP tensor maps between MLLM and LLM;
- detection from keys: ambiguous layouts are a FamilyError asking for --family, never a guess.

Tied embeddings: the configs are taken as written. Under transformers 5.24 that ties lm_head for
InternVL3-8B-hf and Mistral-Small-3.1 (their top level has no ``tie_word_embeddings`` and the config classes
default to True), although the published checkpoints ship a separate lm_head (SOURCES.md). Each of the two is
therefore also built with ``"tie_word_embeddings": false`` at the top level (the published checkpoints).
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from deltakit.cli import main
from deltakit.engine.selection import DEFAULT_MODULES, PRIOR_MODULES, Selection
from deltakit.errors import FamilyError
from deltakit.families import (FAMILIES, FAMILY_NAMES, GROUPS, KINDS, Part, classify_canonical, classify_key,
                               cross_layer_indices, detect_family, expert_parts, get_family, text_parts)
from deltakit.io.checkpoint import Checkpoint, TensorMeta
from deltakit.model import MappedCheckpoint, map_checkpoint, map_parameters, open_model, part_of

CONFIGS = Path(__file__).parent / "data" / "model-configs"
REAL = sorted(p.name for p in CONFIGS.iterdir() if (p / "config.json").is_file())
UNTIED_VARIANTS = ("OpenGVLab__InternVL3-8B-hf", "mistralai__Mistral-Small-3.1-24B-Instruct-2503")
CASES = [(n, False) for n in REAL] + [(n, True) for n in UNTIED_VARIANTS]
CASE_IDS = [n + ("-untied" if u else "") for n, u in CASES]
NAMED_KINDS = set(KINDS) | {"norm", "embed", "lm_head", "router", "cross"}


# -- the nine original families on tiny sharded checkpoints ------------------------------------------
OLD_NINE = ("qwen2", "llama", "mistral", "qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics2", "idefics3")
TEXT_TYPE = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "llava": "llama", "llava_next": "mistral",
             "idefics2": "mistral", "idefics3": "llama"}
PROJECTOR_WORD = {"qwen2_vl": "merger", "qwen2_5_vl": "merger", "llava": "multi_modal_projector",
                  "llava_next": "multi_modal_projector", "idefics2": "connector", "idefics3": "connector"}
LAYER_KINDS = {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "norm"}


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


@pytest.mark.parametrize("family", OLD_NINE)
def test_every_family_on_tiny_sharded_checkpoint(tiny_checkpoint, family):
    folder = tiny_checkpoint(family, layers=3, max_shard_size="40KB")
    config = json.loads((folder / "config.json").read_text())
    m = open_model(folder)
    assert m.family.name == family
    assert len(m.ckpt.files()) >= 2
    assert set(m.text) == _text_reference(config, family)
    assert m.num_layers == 3
    for c, part in m.text.items():
        assert isinstance(part, Part) and part.expert is None and m.infos[part.key].canonical == c
        assert tuple(m.ckpt.meta(part.key).shape) == part.shape
    for i in range(3):
        in_layer = {c: p for c, p in m.text.items() if c.startswith(f"layers.{i}.")}
        assert {m.infos[p.key].kind for p in in_layer.values()} == LAYER_KINDS
        assert {classify_canonical(c)[1] for c in in_layer} == LAYER_KINDS
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
    assert torch.equal(m.get("lm_head.weight"), m.get("embed_tokens.weight"))


# -- real configs on the meta device -------------------------------------------------------------------
def _headers_only(path: str, config: dict, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    """A :class:`Checkpoint` of names and shapes only (no file): what ``save_pretrained`` would write."""
    metas = {k: TensorMeta(k, "meta", 0, t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    return Checkpoint(Path(path), config, {"meta": SimpleNamespace(metas=metas)}, {k: "meta" for k in metas})


@dataclass
class Built:
    raw: dict
    cfg: transformers.PretrainedConfig
    model: torch.nn.Module
    family: object
    mem_infos: dict
    mem: dict[str, Part]               # in memory: canonical -> Part of a parameter
    disk: MappedCheckpoint             # on disk, as transformers 5.24 saves a model built from the config
    disk_shapes: dict[str, tuple[int, ...]]
    tied: bool                         # transformers' own answer: lm_head shares embed_tokens' parameter
    text_prefix: str                   # the decoder module's parameter-name prefix (transformers' get_decoder)

    @property
    def text_numel(self) -> int:
        return sum(p.numel() for n, p in self.model.named_parameters()
                   if n.startswith(self.text_prefix) or n.startswith("lm_head."))


def _build(name: str, raw: dict) -> Built:
    cfg = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = getattr(transformers, raw["architectures"][0])(cfg)
    fam, infos, mem = map_parameters(model)
    # what from_pretrained records after loading a published checkpoint (legacy renamings excluded)
    model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
    state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    disk = map_checkpoint(_headers_only(name, raw, state))
    params = dict(model.named_parameters())
    tied = "lm_head.weight" not in params and model.get_output_embeddings() is not None
    decoder = model.get_decoder()
    prefix = next(n for n, mod in model.named_modules() if mod is decoder) + "."
    return Built(raw, cfg, model, fam, infos, mem, disk, {k: tuple(t.shape) for k, t in state.items()}, tied, prefix)


def built(name: str, untied: bool = False) -> Built:
    """The model of a real config (``untied``: with ``"tie_word_embeddings": false`` at the top level), built once."""
    return _built(name, bool(untied))


@functools.cache
def _built(name: str, untied: bool) -> Built:
    raw = json.loads((CONFIGS / name / "config.json").read_text())
    if untied:
        raw["tie_word_embeddings"] = False
    return _build(name, raw)


def _text(cfg: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    return cfg.get_text_config(decoder=True)


MLLAMA_CROSS_LAYER = 13
"""Tensors of one Llama-3.2-Vision cross-attention layer: cross_attn q/k/v/o + q_norm/k_norm, two layer norms,
MLP gate/up/down, and the attention and MLP tanh gates."""
LINEAR_ATTN = ("attn.qkv", "attn.z", "attn.a", "attn.b", "attn.out",
               "linear_attn.conv", "linear_attn.A_log", "linear_attn.dt_bias", "linear_attn.norm")


def _moe_layer(t, i: int) -> bool:
    experts = getattr(t, "num_experts", 0) or 0
    step = getattr(t, "decoder_sparse_step", 1) or 1
    return bool(experts) and i not in set(getattr(t, "mlp_only_layers", None) or ()) and (i + 1) % step == 0


def expected_kinds(cfg: transformers.PretrainedConfig, tied: bool) -> Counter:
    """Canonical text-tower tensors per kind, from the config alone."""
    t = _text(cfg)
    mt, n = t.model_type, t.num_hidden_layers
    cross = set(getattr(t, "cross_attention_layers", None) or ())
    types = getattr(t, "layer_types", None) or ["full_attention"] * n
    experts = getattr(t, "num_experts", 0) or 0
    c: Counter = Counter()
    for i in range(n):
        if i in cross:
            c["cross"] += MLLAMA_CROSS_LAYER
            continue
        if types[i] == "linear_attention":  # Qwen3.5's gated delta net
            c.update(LINEAR_ATTN)
        else:
            c.update(["attn.q", "attn.k", "attn.v", "attn.o"])
            if mt.startswith("qwen2"):  # q/k/v biases
                c.update(["attn.q", "attn.k", "attn.v"])
            if mt.startswith(("qwen3", "gemma3")):  # q_norm, k_norm
                c["norm"] += 2
        c["norm"] += 2  # input, post_attention
        if mt.startswith("gemma3"):
            c["norm"] += 2  # pre/post feedforward
        if _moe_layer(t, i):
            c.update({"mlp.gate": experts, "mlp.up": experts, "mlp.down": experts, "router": 1})
            if getattr(t, "shared_expert_intermediate_size", None):
                c.update(["shared.gate", "shared.up", "shared.down", "router"])  # + shared_expert_gate
        else:
            c.update(["mlp.gate", "mlp.up", "mlp.down"])
    c.update(["norm", "embed"] + ([] if tied else ["lm_head"]))
    return c


def expected_shape(cfg: transformers.PretrainedConfig, canonical: str) -> tuple[int, ...] | None:
    """The shape of an attention or MLP canonical tensor, from the config (None for other kinds)."""
    t = _text(cfg)
    layer, kind = classify_canonical(canonical)
    h, heads, kv = t.hidden_size, t.num_attention_heads, t.num_key_value_heads
    hd = getattr(t, "head_dim", None) or h // heads
    gate = 2 if t.model_type.startswith("qwen3_5") else 1  # Qwen3.5's gated attention: q_proj also holds the gate
    bias = canonical.endswith(".bias")
    if kind in ("attn.q", "attn.k", "attn.v"):
        out = heads * hd * gate if kind == "attn.q" else kv * hd
        return (out,) if bias else (out, h)
    if kind == "attn.o":
        return (h, heads * hd)
    if kind in ("mlp.gate", "mlp.up", "mlp.down"):
        inter = t.moe_intermediate_size if ".experts." in canonical else t.intermediate_size
        return (h, inter) if kind == "mlp.down" else (inter, h)
    if kind in ("shared.gate", "shared.up", "shared.down"):
        inter = t.shared_expert_intermediate_size
        return (h, inter) if kind == "shared.down" else (inter, h)
    if kind == "router":
        return (1, h) if canonical.endswith("shared_expert_gate.weight") else (t.num_experts, h)
    if kind == "lm_head":
        return (t.vocab_size, h)
    return None


def _kinds(parts: dict[str, Part]) -> Counter:
    return Counter(classify_canonical(c)[1] for c in parts)


def _check_tiling(parts: dict[str, Part], shapes: dict[str, tuple[int, ...]], where: str) -> int:
    """Per-expert parts of each fused tensor cover it exactly once; returns how many fused tensors there were."""
    by_key: dict[str, list[Part]] = defaultdict(list)
    for p in parts.values():
        if p.expert is not None:
            by_key[p.key].append(p)
    for key, ps in by_key.items():
        shape = shapes[key]
        assert len(shape) == 3, (where, key, shape)
        experts, first, second = shape
        transposed = {p.transposed for p in ps}
        assert len(transposed) == 1, (where, key)
        rows, cols = (second, first) if transposed.pop() else (first, second)
        spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for p in ps:
            assert p.shape[1] == cols, (where, key, p)
            spans[p.expert].append((p.offset, p.offset + p.shape[0]))
        assert sorted(spans) == list(range(experts)), (where, key)
        for j, sp in spans.items():
            sp.sort()
            assert sp[0][0] == 0 and sp[-1][1] == rows and all(a[1] == b[0] for a, b in zip(sp, sp[1:])), (where, key, j, sp)
        assert sum(math.prod(p.shape) for p in ps) == math.prod(shape), (where, key)
        meta = torch.empty(shape, device="meta")
        assert all(tuple(part_of(meta, p).shape) == p.shape for p in ps), (where, key)
    return len(by_key)


@pytest.mark.parametrize("name", REAL)
def test_real_config_detected_by_model_type(name):
    b = built(name)
    assert detect_family(b.raw).name == b.raw["model_type"]
    assert b.family.name == b.disk.family.name == b.raw["model_type"]
    no_type = {k: v for k, v in b.raw.items() if k != "model_type"}
    assert detect_family(no_type).name == b.raw["model_type"]  # from architectures


@pytest.mark.parametrize("name,untied", CASES, ids=CASE_IDS)
def test_real_config_every_text_tensor_classified_and_counted(name, untied):
    b = built(name, untied)
    expected = expected_kinds(b.cfg, b.tied)
    for where, infos, parts in (("memory", b.mem_infos, b.mem), ("disk", b.disk.infos, b.disk.text)):
        assert not [k for k, i in infos.items() if i.role == "other"], where
        text_infos = [i for i in infos.values() if i.role == "text"]
        assert not [i.key for i in text_infos if i.kind == "other"], where
        assert {i.kind for i in text_infos} <= NAMED_KINDS | {"experts"}, where
        assert set(_kinds(parts)) <= NAMED_KINDS, where
        assert _kinds(parts) == expected, (where, _kinds(parts) - expected, expected - _kinds(parts))
        # parameter count: the canonical parts add up to the decoder's parameters (+ lm_head when untied)
        assert sum(math.prod(p.shape) for p in parts.values()) == b.text_numel, where
        for c, p in parts.items():
            want = expected_shape(b.cfg, c)
            assert want is None or p.shape == want, (where, c, p.shape, want)
    # in memory every text parameter is classified text, and nothing outside the decoder and lm_head is
    text_params = {n for n in b.mem_infos if n.startswith(b.text_prefix) or n.startswith("lm_head.")}
    assert {n for n, i in b.mem_infos.items() if i.role == "text"} == text_params
    paired = _text(b.cfg).num_hidden_layers - len(b.disk.cross)
    assert b.disk.num_layers == paired
    assert {i.layer for i in b.mem_infos.values() if i.layer is not None} == set(range(paired))


@pytest.mark.parametrize("name,untied", CASES, ids=CASE_IDS)
def test_real_config_memory_and_disk_map_to_the_same_canonical_tensors(name, untied):
    """What makes a prior exported from disk bind in memory: same canonical names, same shapes."""
    b = built(name, untied)
    mem = {c: p.shape for c, p in b.mem.items()}
    disk = {c: p.shape for c, p in b.disk.text.items()}
    if b.tied:
        assert "lm_head.weight" not in mem and "lm_head.weight" not in disk
    else:
        assert "lm_head.weight" in mem and "lm_head.weight" in disk
    assert mem.keys() == disk.keys(), (sorted(mem.keys() - disk.keys())[:5], sorted(disk.keys() - mem.keys())[:5])
    assert [c for c in mem if mem[c] != disk[c]] == []
    n_mem = _check_tiling(b.mem, {n: tuple(p.shape) for n, p in b.model.named_parameters()}, "memory")
    n_disk = _check_tiling(b.disk.text, b.disk_shapes, "disk")
    moe_layers = sum(_moe_layer(_text(b.cfg), i) for i in range(_text(b.cfg).num_hidden_layers))
    assert n_mem == 2 * moe_layers  # gate_up_proj and down_proj per MoE layer
    assert n_disk in (0, 2 * moe_layers)


@pytest.mark.parametrize("name,untied", CASES, ids=CASE_IDS)
def test_real_config_tied_flag_agrees_with_transformers(name, untied):
    """A folder saved by transformers from the config is ``tied`` (lm_head resolves to embed_tokens) exactly when
    transformers ties the model's lm_head (its rule: the top-level config's ``tie_word_embeddings``, class default)."""
    b = built(name, untied)
    assert b.disk.tied == b.tied, f"{name}: deltakit reads tied={b.disk.tied}, transformers 5.24 ties={b.tied}"
    if b.tied:
        assert b.disk.resolve("lm_head.weight") == b.disk.text["embed_tokens.weight"]


KEYMAP = json.loads((CONFIGS / "KEYMAP-transformers-5.24.json").read_text())
BARE_BASE_MODEL_KEYS = {("Qwen__Qwen3-8B", "layers.0.self_attn.q_proj.weight")}
"""KEYMAP keys transformers loads by adding its base-model prefix (a checkpoint saved from ``Qwen3Model``)."""


def _keymap_mismatches(entries) -> list[str]:
    bad = []
    for name, disk, mem in entries:
        b = built(name, name in UNTIED_VARIANTS)  # the published checkpoints of those two ship an lm_head
        d, m = classify_key(disk, b.family, b.disk.cross), b.mem_infos.get(mem)
        if m is None or d.role != m.role:
            bad.append(f"{name}: {disk} ({d.role}) -> {mem} ({m.role if m else 'not a parameter'})")
        elif d.kind == "experts":  # a fused tensor on disk too: same stored name, same per-expert parts
            if d.canonical != m.canonical or not any(p.key == mem for p in b.mem.values()):
                bad.append(f"{name}: fused {disk} ({d.canonical}) -> {mem} ({m.canonical})")
        elif d.role == "text" and (d.canonical not in b.mem or b.mem[d.canonical].key != mem):
            bad.append(f"{name}: {disk} -> canonical {d.canonical!r}, which memory holds in "
                       f"{b.mem[d.canonical].key if d.canonical in b.mem else None!r}, not {mem!r}")
    return bad


def test_keymap_disk_and_memory_names_map_to_the_same_canonical_tensor():
    """For the on-disk keys transformers 5.24 itself loads (KEYMAP: published key -> in-memory name), deltakit
    gives both names the same role, and the canonical tensor of the disk key lives in that parameter (a fused
    expert tensor for Qwen3-30B-A3B's per-expert keys)."""
    entries = [(n, d, m) for n, e in KEYMAP.items() for d, (m, _, real) in e.items()
               if real and (n, d) not in BARE_BASE_MODEL_KEYS]
    assert len(entries) >= 30
    assert _keymap_mismatches(entries) == []


def test_keymap_bare_base_model_keys():
    assert _keymap_mismatches([(n, d, KEYMAP[n][d][0]) for n, d in sorted(BARE_BASE_MODEL_KEYS)]) == []


def test_moe_disk_layouts():
    """Qwen3-30B-A3B: one tensor per expert on disk, fused [E, 2I, H] / [E, H, I] in memory.

    Qwen3-VL-30B-A3B: transformers 5.24 saves a model it built in the in-memory layout (its transpose on save
    is skipped when the shape already matches the parameter), while the published checkpoint holds
    [E, H, 2I] / [E, I, H] (SOURCES.md); both must map to the same canonical per-expert tensors.
    """
    llm = built("Qwen__Qwen3-30B-A3B")
    e, h, inter = 128, 2048, 768
    assert llm.disk_shapes["model.layers.0.mlp.experts.5.gate_proj.weight"] == (inter, h)
    assert llm.disk_shapes["model.layers.0.mlp.experts.5.down_proj.weight"] == (h, inter)
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in llm.disk_shapes)
    assert llm.disk.text["layers.47.mlp.experts.127.up_proj.weight"] == \
        Part("model.layers.47.mlp.experts.127.up_proj.weight", (inter, h))
    assert llm.mem["layers.0.mlp.experts.5.up_proj.weight"] == \
        Part("model.layers.0.mlp.experts.gate_up_proj", (inter, h), 5, inter, False)
    assert dict(llm.model.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"].shape == (e, 2 * inter, h)

    vl = built("Qwen__Qwen3-VL-30B-A3B-Instruct")
    gu, dn = "model.language_model.layers.0.mlp.experts.gate_up_proj", "model.language_model.layers.0.mlp.experts.down_proj"
    assert (vl.disk_shapes[gu], vl.disk_shapes[dn]) == ((e, 2 * inter, h), (e, h, inter))  # transformers' own save
    hub_shapes = {k: (s[0], s[2], s[1]) if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else s
                  for k, s in vl.disk_shapes.items()}
    assert (hub_shapes[gu], hub_shapes[dn]) == ((e, h, 2 * inter), (e, inter, h))  # the published layout
    hub = map_checkpoint(_headers_only("hub", vl.raw, {k: torch.empty(s, device="meta") for k, s in hub_shapes.items()}))
    assert {c: p.shape for c, p in hub.text.items()} == {c: p.shape for c, p in vl.mem.items()}
    assert hub.text["layers.0.mlp.experts.5.up_proj.weight"] == Part(gu, (inter, h), 5, inter, True)
    assert _check_tiling(hub.text, hub_shapes, "hub") == 2 * 48


def test_fused_expert_parts_hold_the_per_expert_values():
    """On real values: the in-memory fused layout, its transpose and transformers' per-expert save agree."""
    cfg = transformers.Qwen3MoeConfig(hidden_size=16, intermediate_size=40, moe_intermediate_size=24, num_experts=3,
                                      num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, vocab_size=32)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    fam, _, mem = map_parameters(model)
    params = dict(model.named_parameters())
    disk = revert_weight_conversion(model, model.state_dict())
    on_disk = map_checkpoint(_headers_only("d", cfg.to_dict(), disk))
    fused = {k: v.transpose(1, 2).contiguous() for k, v in params.items() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    hub = text_parts([classify_key(k, fam) for k in fused], {k: tuple(v.shape) for k, v in fused.items()}, "hub")
    assert len(hub) == 2 * 3 * 3 and all(p.transposed for p in hub.values())
    for c, part in mem.items():
        value = part_of(params[part.key].data, part)
        assert torch.equal(value, disk[on_disk.text[c].key]), c
        if c in hub:
            assert torch.equal(value, part_of(fused[hub[c].key], hub[c])), c


def test_expert_parts_rejects_what_is_not_a_fused_pair():
    info = classify_key("model.layers.0.mlp.experts.gate_up_proj", get_family("qwen3_moe"))
    assert info.kind == "experts" and info.canonical == "layers.0.mlp.experts.gate_up_proj"
    assert len(expert_parts(info, (2, 6, 4), "fused")) == 4
    with pytest.raises(FamilyError, match="odd"):
        expert_parts(info, (2, 5, 4), "fused")
    with pytest.raises(FamilyError):
        expert_parts(info, (2, 6, 4), "per_expert")
    shapes = {"model.layers.0.mlp.experts.gate_up_proj": (2, 6, 4), "model.layers.0.mlp.experts.down_proj": (2, 5, 3)}
    infos = [classify_key(k, get_family("qwen3_moe")) for k in shapes]
    with pytest.raises(FamilyError, match="fit neither"):
        text_parts(infos, shapes, "bad")
    with pytest.raises(FamilyError, match="no fused down_proj"):
        text_parts(infos[:1], dict(list(shapes.items())[:1]), "lonely")


MULTIMODAL_PARTS = {  # family -> (words every vision key has one of, words every projector key has one of)
    "qwen": (("visual.",), ("merger",)),
    "llava": (("vision_tower.",), ("multi_modal_projector.", "image_newline")),
    "mllama": (("vision_model.",), ("multi_modal_projector.",)),
    "idefics2": (("vision_model.",), ("connector.",)),
}


@pytest.mark.parametrize("name", [n for n in REAL if get_family(json.loads((CONFIGS / n / "config.json").read_text())
                                                                   ["model_type"]).multimodal])
def test_real_config_vision_and_projector_keys(name):
    b = built(name)
    fam = b.family.name
    words = MULTIMODAL_PARTS["qwen" if fam.startswith("qwen") else fam if fam in MULTIMODAL_PARTS else "llava"]
    for where, infos in (("memory", b.mem_infos), ("disk", b.disk.infos)):
        roles = Counter(i.role for i in infos.values())
        assert roles["vision"] and roles["projector"] and not roles["other"], (where, roles)
        for i in infos.values():
            if i.role in ("vision", "projector"):
                assert i.canonical is None and i.layer is None and i.kind is None
                wanted = words[0] if i.role == "vision" else words[1]
                assert any(w in i.key for w in wanted), (where, i.key, i.role)
        text = [k for k, i in infos.items() if i.role == "text"]
        assert not [k for k in text if any(w in k for w in words[0] + words[1])], where


def test_text_only_configs_have_only_text():
    for name in REAL:
        b = built(name)
        if not b.family.multimodal:
            assert {i.role for i in b.disk.infos.values()} == {i.role for i in b.mem_infos.values()} == {"text"}, name


def test_tie_caveat_for_internvl_and_mistral3():
    """As written (transformers 5.24) both tie; with the top level untied, as published, lm_head is separate."""
    for name in UNTIED_VARIANTS:
        tied, untied = built(name), built(name, True)
        t = _text(tied.cfg)
        assert tied.tied and not untied.tied
        assert untied.text_numel - tied.text_numel == t.vocab_size * t.hidden_size
        assert untied.mem["lm_head.weight"].shape == untied.disk.text["lm_head.weight"].shape == (t.vocab_size, t.hidden_size)
    total = {n: sum(p.numel() for p in b.model.parameters()) for n, b in
             (("tied", built(UNTIED_VARIANTS[0])), ("untied", built(UNTIED_VARIANTS[0], True)))}
    assert (round(total["tied"] / 1e9, 2), round(total["untied"] / 1e9, 2)) == (7.40, 7.94)  # SOURCES.md
    assert round(sum(p.numel() for p in built(UNTIED_VARIANTS[1]).model.parameters()) / 1e9, 2) == 23.34


# -- Qwen3.5 (no published config in tests/data): small synthetic configs ------------------------------
def _qwen35_text(moe: bool) -> dict:
    text = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                vocab_size=256, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=False,
                layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention",
                             "linear_attention", "full_attention"])
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, shared_expert_intermediate_size=128)
    else:
        text.update(intermediate_size=128)
    return text


QWEN35 = {
    "qwen3_5_text": dict(_qwen35_text(False), model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"]),
    "qwen3_5_moe_text": dict(_qwen35_text(True), model_type="qwen3_5_moe_text", architectures=["Qwen3_5MoeForCausalLM"]),
    "qwen3_5": dict(model_type="qwen3_5", architectures=["Qwen3_5ForConditionalGeneration"], tie_word_embeddings=False,
                    text_config=_qwen35_text(False),
                    vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64)),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"],
                        tie_word_embeddings=False, text_config=_qwen35_text(True),
                        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64)),
}


@functools.cache
def built_qwen35(family: str) -> Built:
    return _build(f"synthetic-{family}", json.loads(json.dumps(QWEN35[family])))


@pytest.mark.parametrize("family", sorted(QWEN35))
def test_qwen35_linear_attention_layers(family):
    b = built_qwen35(family)
    assert b.family.name == family and detect_family(b.raw).name == family
    expected = expected_kinds(b.cfg, b.tied)
    assert expected["attn.qkv"] == 4 and expected["attn.q"] == 2
    for where, infos, parts in (("memory", b.mem_infos, b.mem), ("disk", b.disk.infos, b.disk.text)):
        assert not [k for k, i in infos.items() if i.role == "other" or i.kind == "other"], where
        assert _kinds(parts) == expected, (where, _kinds(parts) - expected, expected - _kinds(parts))
        assert sum(math.prod(p.shape) for p in parts.values()) == b.text_numel, where
        for c, p in parts.items():
            want = expected_shape(b.cfg, c)
            assert want is None or p.shape == want, (where, c, p.shape, want)
    assert {c: p.shape for c, p in b.mem.items()} == {c: p.shape for c, p in b.disk.text.items()}
    layer0 = {classify_canonical(c)[1] for c in b.mem if c.startswith("layers.0.")}
    layer3 = {classify_canonical(c)[1] for c in b.mem if c.startswith("layers.3.")}
    assert set(LINEAR_ATTN) <= layer0 and not {"attn.q", "attn.k", "attn.v", "attn.o"} & layer0
    assert {"attn.q", "attn.k", "attn.v", "attn.o"} <= layer3 and not set(LINEAR_ATTN) & layer3
    if "moe" in family:
        assert b.disk.text["layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
        assert b.disk.text["layers.0.mlp.experts.3.down_proj.weight"].key.endswith("layers.0.mlp.experts.3.down_proj.weight")
        assert _check_tiling(b.mem, {n: tuple(p.shape) for n, p in b.model.named_parameters()}, "memory") == 12
    if get_family(family).multimodal:
        assert Counter(i.role for i in b.disk.infos.values())["projector"] > 0


@pytest.mark.parametrize("mllm,llm", [("qwen3_5", "qwen3_5_text"), ("qwen3_5_moe", "qwen3_5_moe_text")])
def test_qwen35_mllm_and_its_llm_share_every_text_tensor(mllm, llm):
    a, b = built_qwen35(mllm), built_qwen35(llm)
    assert a.family.text_type == llm
    assert {c: p.shape for c, p in a.mem.items()} == {c: p.shape for c, p in b.mem.items()}
    assert {c: p.shape for c, p in a.disk.text.items()} == {c: p.shape for c, p in b.disk.text.items()}


def _text_model_type(name: str) -> str | None:
    return (json.loads((CONFIGS / name / "config.json").read_text()).get("text_config") or {}).get("model_type")


@pytest.mark.parametrize("name", [n for n in REAL if _text_model_type(n) in FAMILY_NAMES])
def test_family_llm_type_matches_the_configs_text_tower(name):
    """``Family.text_type_of`` (the LLM a partner is built as, and what lineage compares) is the MLLM's text tower:
    LLaVA-Next-8B's is Llama although the family's default (llava-v1.6-mistral) is Mistral."""
    b = built(name)
    config = json.loads((CONFIGS / name / "config.json").read_text())
    assert not get_family(_text_model_type(name)).multimodal
    assert b.family.text_type_of(config) == _text_model_type(name)


# -- default module selections -------------------------------------------------------------------------
@pytest.mark.parametrize("name", REAL)
def test_default_selections(name):
    """prior = attn + mlp (experts and Qwen3.5's linear-attention projections included); merge = every weight of
    the paired layers and the final norm; diff = all. Never: mllama's cross layers in a prior."""
    b = built(name)
    prior, merge, diff = (Selection.parse(DEFAULT_MODULES[c]) for c in ("prior", "merge", "diff"))
    groups = {c: classify_canonical(c)[1].split(".")[0] for c in b.mem}
    assert {c for c in b.mem if prior(c)} == {c for c, g in groups.items() if g in ("attn", "mlp")}
    assert {c for c in b.mem if not merge(c)} == {c for c, g in groups.items() if g in ("embed", "lm_head", "cross")}
    assert all(diff(c) for c in b.mem)
    assert "cross" not in PRIOR_MODULES and "other" not in PRIOR_MODULES and set(GROUPS) - {"other", "cross"} <= set(PRIOR_MODULES)


# -- the paper's pairings ------------------------------------------------------------------------------
PAIRINGS = [
    ("Qwen__Qwen2.5-VL-7B-Instruct", "deepseek-ai__DeepSeek-R1-Distill-Qwen-7B", 28),
    ("Qwen__Qwen3-VL-8B-Instruct", "Qwen__Qwen3-8B", 36),
    ("Qwen__Qwen3-VL-30B-A3B-Instruct", "Qwen__Qwen3-30B-A3B", 48),
    ("OpenGVLab__InternVL3-8B-hf", "deepseek-ai__DeepSeek-R1-Distill-Qwen-7B", 28),
    ("meta-llama__Llama-3.2-11B-Vision", "deepseek-ai__DeepSeek-R1-Distill-Llama-8B", 32),
    ("llava-hf__llama3-llava-next-8b-hf", None, 32),  # no reasoning LLM config available (SOURCES.md)
]


def _attn_mlp(parts: dict[str, Part]) -> dict[str, tuple[int, ...]]:
    return {c: p.shape for c, p in parts.items() if classify_canonical(c)[1].split(".")[0] in ("attn", "mlp")}


@pytest.mark.parametrize("mllm,llm,paired", PAIRINGS, ids=[p[0] for p in PAIRINGS])
def test_pairing_maps_every_attention_and_mlp_tensor(mllm, llm, paired):
    a = built(mllm)
    ours = _attn_mlp(a.mem)
    t = _text(a.cfg)
    per_layer = 4 + 3 * (getattr(t, "num_experts", 0) or 1) + (3 if t.model_type.startswith("qwen2") else 0)
    assert len(ours) == paired * per_layer
    assert {classify_canonical(c)[0] for c in ours} == set(range(paired))
    if llm is not None:
        b = built(llm)
        theirs = _attn_mlp(b.mem)
        assert ours.keys() == theirs.keys(), (sorted(ours.keys() - theirs.keys())[:5], sorted(theirs.keys() - ours.keys())[:5])
        assert [c for c in ours if ours[c] != theirs[c]] == []
        assert b.disk.num_layers == a.disk.num_layers == paired
        assert ours.keys() <= a.disk.text.keys() and theirs.keys() <= b.disk.text.keys()


def test_mllama_cross_layers_and_renumbering():
    b = built("meta-llama__Llama-3.2-11B-Vision")
    cross = [3, 8, 13, 18, 23, 28, 33, 38]
    assert b.raw["text_config"]["cross_attention_layers"] == cross
    assert sorted(b.disk.cross) == cross
    assert sorted(cross_layer_indices(b.family, b.raw)) == cross
    assert sorted(cross_layer_indices(b.family, {}, b.disk_shapes)) == cross  # from the cross_attn keys
    kept = [i for i in range(40) if i not in cross]
    assert len(kept) == 32
    for where, parts in (("memory", b.mem), ("disk", b.disk.text)):
        for c, p in parts.items():
            layer, kind = classify_canonical(c)
            if c.startswith("cross_layers."):
                i = int(c.split(".")[1])
                assert i in cross and kind == "cross" and layer is None and f"layers.{i}." in p.key, (where, c)
            elif layer is not None:
                assert f"layers.{kept[layer]}." in p.key, (where, c, p.key)
        assert parts["layers.3.self_attn.q_proj.weight"].key.endswith("layers.4.self_attn.q_proj.weight")
        assert parts["layers.31.mlp.down_proj.weight"].key.endswith("layers.39.mlp.down_proj.weight")
        assert parts["cross_layers.3.cross_attn.q_proj.weight"].key.endswith("layers.3.cross_attn.q_proj.weight")
        assert {int(c.split(".")[1]) for c in parts if c.startswith("cross_layers.")} == set(cross)
    assert b.mem["embed_tokens.weight"].shape == (128264, 4096) and b.mem["lm_head.weight"].shape == (128256, 4096)
    fam = get_family("mllama")
    info = classify_key("model.language_model.layers.9.mlp.up_proj.weight", fam, frozenset(cross))
    assert (info.canonical, info.layer, info.kind) == ("layers.7.mlp.up_proj.weight", 7, "mlp.up")
    info = classify_key("language_model.model.layers.8.cross_attn_attn_gate", fam, frozenset(cross))
    assert (info.role, info.canonical, info.layer, info.kind) == ("text", "cross_layers.8.cross_attn_attn_gate", None, "cross")
    assert classify_key("model.language_model.layers.9.mlp.up_proj.weight", fam).canonical == "layers.9.mlp.up_proj.weight"
    assert cross_layer_indices(get_family("llama"), b.raw, b.disk_shapes) == frozenset()


# -- detection -----------------------------------------------------------------------------------------
def test_every_family_detected_by_model_type_and_architecture():
    assert len(FAMILY_NAMES) == len(set(FAMILY_NAMES)) == 23
    for f in FAMILIES:
        assert detect_family({"model_type": f.name}) is f
        assert detect_family({"architectures": list(f.architectures)}) is f
        assert get_family(f.text_type).multimodal is False
    with pytest.raises(FamilyError, match="unknown family 'gpt9'"):
        get_family("gpt9")


@pytest.mark.parametrize("name", REAL)
def test_keys_alone_never_guess_wrong(name):
    """Without a config, keys either name the family exactly or are a FamilyError asking for --family."""
    b = built(name)
    # per-expert keys beyond expert 0 say nothing more about the layout (and cost seconds at 128 experts)
    for keys in ([k for k in names if not re.search(r"experts\.[1-9]\d*\.", k)] for names in (b.disk_shapes, b.mem_infos)):
        try:
            fam = detect_family({}, keys)
        except FamilyError as exc:
            assert "pass --family" in str(exc)
            continue
        assert fam.name == b.family.name, (name, fam.name)


def test_detection_from_keys_and_family_override(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("qwen2_5_vl")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in src.glob("*.safetensors"):
        shutil.copyfile(f, bare / f.name)  # copies: deltakit refuses links leading out of a model folder
    (bare / "config.json").write_text("{}")
    # qwen2_vl, qwen2_5_vl, qwen3_vl, ... share this layout: keys alone cannot tell them apart
    with pytest.raises(FamilyError, match="pass --family") as exc:
        open_model(bare)
    assert all(f in str(exc.value) for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))
    m = open_model(bare, "qwen2_5_vl")
    assert m.family.name == "qwen2_5_vl"
    assert m.text == open_model(src).text

    llm = tiny_checkpoint("qwen2")
    llm_bare = tmp_path / "llm-bare"
    llm_bare.mkdir()
    for f in llm.glob("*.safetensors"):
        shutil.copyfile(f, llm_bare / f.name)
    (llm_bare / "config.json").write_text("{}")
    with pytest.raises(FamilyError, match="pass --family") as exc:
        open_model(llm_bare)  # qwen2, llama, mistral, ... all save model.layers.*
    assert all(f in str(exc.value) for f in ("qwen2", "llama", "mistral"))
    assert open_model(llm_bare, "qwen2").text == open_model(llm).text

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["diff", str(bare), str(src)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error:") and "--family" in err and "Traceback" not in err
    out = tmp_path / "bare.json"
    main(["diff", str(bare), str(src), "--family-a", "qwen2_5_vl", "--json", str(out)])
    report = json.loads(out.read_text())
    assert (report["a"]["family"], report["b"]["family"]) == ("qwen2_5_vl", "qwen2_5_vl")
    assert report["summary"]["median_layer_cosine"] == pytest.approx(1.0)

    out = tmp_path / "r.json"
    main(["diff", str(llm_bare), str(llm), "--family-a", "qwen2", "--json", str(out)])
    report = json.loads(out.read_text())
    assert (report["a"]["family"], report["b"]["family"]) == ("qwen2", "qwen2")
    assert report["summary"]["median_layer_cosine"] == pytest.approx(1.0)

    for flag, msg in (("idefics2", "no text-tower layer"), ("gpt9", "unknown family 'gpt9'")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["diff", str(llm), str(llm), "--family-b", flag])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and "Traceback" not in err
