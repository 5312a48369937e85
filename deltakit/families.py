"""Model families: how each checkpoint layout names its text tower, vision tower and projector.

Every family maps its keys, on disk and in memory, to one canonical text-tower naming
(``embed_tokens.weight``, ``layers.{i}.self_attn.q_proj.weight``, ``layers.{i}.mlp.down_proj.weight``,
``layers.{i}.mlp.experts.{j}.gate_proj.weight``, ``norm.weight``, ``lm_head.weight``, ...). A family is
data: a :class:`Layout` of key prefixes, the ``model_type``/``architectures`` values that identify it,
and what its tower needs beyond prefixes: how its MoE experts are stored (:data:`EXPERT_LAYOUTS`) and
which config field lists layers only the MLLM has (Llama-3.2-Vision's cross-attention layers). Adding
a family is a new entry in :data:`FAMILIES`, no new code.

A canonical tensor lives in one stored tensor, whole or as a :class:`Part` of a fused one (expert ``j``
of ``mlp.experts.gate_up_proj``, possibly transposed); :func:`text_parts` resolves every key of a
checkpoint or model to the canonical tensors it holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from deltakit.errors import FamilyError

ROLES = ("text", "vision", "projector", "other")
GROUPS = ("attn", "mlp", "norm", "embed", "lm_head", "router", "shared", "linear_attn", "cross", "other")
"""Module groups: a kind's part before the dot (``attn.q`` is in ``attn``)."""
KINDS = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "attn.z", "attn.a", "attn.b", "attn.out",
         "mlp.gate", "mlp.up", "mlp.down", "shared.gate", "shared.up", "shared.down",
         "linear_attn.conv", "linear_attn.A_log", "linear_attn.dt_bias", "linear_attn.norm")
"""Module kinds finer than their group. ``attn.qkv ... attn.out`` are Qwen3.5's linear-attention
projections (``linear_attn.in_proj_qkv/z/a/b``, ``out_proj``); MoE experts are ``mlp.gate/up/down`` with
an expert index; ``shared.*`` a shared expert; ``router`` the expert router (``mlp.gate``, ``shared_expert_gate``);
``cross`` a layer only the MLLM has (Llama-3.2-Vision's cross-attention layers, canonically ``cross_layers.{i}.*``)."""

EXPERT_LAYOUTS = ("per_expert", "fused", "fused_transposed")
"""How MoE expert weights are stored: one tensor per expert (``mlp.experts.{j}.gate_proj.weight`` [I, H]);
fused as transformers 5 holds them in memory (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]);
or fused and transposed ([E, H, 2I], [E, I, H]: Qwen3-VL-MoE on disk)."""


@dataclass(frozen=True)
class Layout:
    """Key prefixes of one checkpoint layout; within a key, the longest matching prefix wins."""

    text: tuple[str, ...]
    lm_head: tuple[str, ...] = ("lm_head.",)
    vision: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """A model family: its name, how to recognise it from ``config.json``, its key layout and tower data.

    ``text_type`` is the ``model_type`` of a standalone LLM with the same text tower (itself for an LLM).
    ``cross_layers`` names the text config field listing layers only this MLLM has; the other layers
    pair with the LLM's layer ``i - (MLLM-only layers before i)``. MoE experts need no entry: their
    :data:`EXPERT_LAYOUTS` entry is read from each checkpoint (see :func:`fused_layout`).
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layout: Layout
    multimodal: bool
    text_type: str = ""
    cross_layers: str | None = None

    def __post_init__(self) -> None:
        if not self.text_type:
            object.__setattr__(self, "text_type", self.name)

    def text_type_of(self, config: dict) -> str:
        """The LLM ``model_type`` of this model's text tower: its config's ``text_config.model_type`` when that
        names a text-only family (LLaVA-Next ships Mistral and Llama towers), else :attr:`text_type`."""
        named = (config.get("text_config") or {}).get("model_type")
        return named if any(f.name == named and not f.multimodal for f in FAMILIES) else self.text_type


# transformers 5 saves a text-only model as model.*; Qwen3.5's text models as model.language_model.*.
# A base model saved without its LM head wrapper has no model. prefix (the empty prefix, shortest, loses to the others).
CAUSAL_LM = Layout(text=("model.", ""))
QWEN35_TEXT = Layout(text=("model.language_model.", "model.", ""))
# transformers < 4.52 and >= 5 save Qwen2-VL/2.5-VL as model.* / visual.*; 4.52-4.57 and Qwen3-VL as model.language_model.* / model.visual.*.
QWEN_VL = Layout(
    text=("model.language_model.", "model."),
    vision=("model.visual.", "visual."),
    projector=("model.visual.merger.", "visual.merger.", "model.visual.deepstack_merger_list.", "visual.deepstack_merger_list."),
)
# LLaVA-style: language_model.model.* on disk (model.language_model.* in memory), vision_tower.*, multi_modal_projector.*
LLAVA = Layout(
    text=("model.language_model.", "language_model.model."),
    lm_head=("lm_head.", "language_model.lm_head."),
    vision=("model.vision_tower.", "vision_tower."),
    projector=("model.multi_modal_projector.", "multi_modal_projector.", "model.image_newline", "image_newline"),
)
MLLAMA = Layout(
    text=("model.language_model.", "language_model.model."),
    lm_head=("lm_head.", "language_model.lm_head."),
    vision=("model.vision_model.", "vision_model."),
    projector=("model.multi_modal_projector.", "multi_modal_projector."),
)
IDEFICS = Layout(text=("model.text_model.",), vision=("model.vision_model.",), projector=("model.connector.",))

FAMILIES: tuple[Family, ...] = (
    Family("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), CAUSAL_LM, False),
    Family("llama", ("llama",), ("LlamaForCausalLM",), CAUSAL_LM, False),
    Family("mistral", ("mistral",), ("MistralForCausalLM",), CAUSAL_LM, False),
    Family("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), CAUSAL_LM, False),
    Family("qwen3_moe", ("qwen3_moe",), ("Qwen3MoeForCausalLM",), CAUSAL_LM, False),
    Family("qwen3_5_text", ("qwen3_5_text",), ("Qwen3_5ForCausalLM",), QWEN35_TEXT, False),
    Family("qwen3_5_moe_text", ("qwen3_5_moe_text",), ("Qwen3_5MoeForCausalLM",), QWEN35_TEXT, False),
    Family("gemma3_text", ("gemma3_text",), ("Gemma3ForCausalLM",), CAUSAL_LM, False),
    Family("qwen2_vl", ("qwen2_vl",), ("Qwen2VLForConditionalGeneration",), QWEN_VL, True, "qwen2"),
    Family("qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLForConditionalGeneration",), QWEN_VL, True, "qwen2"),
    Family("qwen3_vl", ("qwen3_vl",), ("Qwen3VLForConditionalGeneration",), QWEN_VL, True, "qwen3"),
    Family("qwen3_vl_moe", ("qwen3_vl_moe",), ("Qwen3VLMoeForConditionalGeneration",), QWEN_VL, True, "qwen3_moe"),
    Family("qwen3_5", ("qwen3_5",), ("Qwen3_5ForConditionalGeneration",), QWEN_VL, True, "qwen3_5_text"),
    Family("qwen3_5_moe", ("qwen3_5_moe",), ("Qwen3_5MoeForConditionalGeneration",), QWEN_VL, True, "qwen3_5_moe_text"),
    Family("llava", ("llava",), ("LlavaForConditionalGeneration",), LLAVA, True, "llama"),
    Family("llava_next", ("llava_next",), ("LlavaNextForConditionalGeneration",), LLAVA, True, "mistral"),
    Family("llava_onevision", ("llava_onevision",), ("LlavaOnevisionForConditionalGeneration",), LLAVA, True, "qwen2"),
    Family("internvl", ("internvl",), ("InternVLForConditionalGeneration",), LLAVA, True, "qwen2"),
    Family("gemma3", ("gemma3",), ("Gemma3ForConditionalGeneration",), LLAVA, True, "gemma3_text"),
    Family("mistral3", ("mistral3",), ("Mistral3ForConditionalGeneration",), LLAVA, True, "mistral"),
    Family("mllama", ("mllama",), ("MllamaForConditionalGeneration",), MLLAMA, True, "llama",
           cross_layers="cross_attention_layers"),
    Family("idefics2", ("idefics2",), ("Idefics2ForConditionalGeneration",), IDEFICS, True, "mistral"),
    Family("idefics3", ("idefics3",), ("Idefics3ForConditionalGeneration",), IDEFICS, True, "llama"),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)

_L = r"layers\.(\d+)\."
_KINDS = [
    (re.compile(_L + r"self_attn\.([qkvo])_proj\.(weight|bias)$"), lambda m: f"attn.{m.group(2)}"),
    (re.compile(_L + r"linear_attn\.in_proj_(qkv|z|a|b)\.weight$"), lambda m: f"attn.{m.group(2)}"),
    (re.compile(_L + r"linear_attn\.out_proj\.weight$"), lambda m: "attn.out"),
    (re.compile(_L + r"mlp\.(?:experts\.\d+\.)?(gate|up|down)_proj\.weight$"), lambda m: f"mlp.{m.group(2)}"),
    (re.compile(_L + r"mlp\.shared_experts?\.(gate|up|down)_proj\.weight$"), lambda m: f"shared.{m.group(2)}"),
    (re.compile(_L + r"mlp\.(gate|shared_expert_gate)\.weight$"), lambda m: "router"),
    (re.compile(_L + r"self_attn\.[qk]_norm\.weight$"), lambda m: "norm"),
    (re.compile(_L + r"(input|post_attention|pre_feedforward|post_feedforward)_layernorm\.weight$"), lambda m: "norm"),
    (re.compile(_L + r"linear_attn\.conv1d\.weight$"), lambda m: "linear_attn.conv"),
    (re.compile(_L + r"linear_attn\.(A_log|dt_bias)$"), lambda m: f"linear_attn.{m.group(2)}"),
    (re.compile(_L + r"linear_attn\.norm\.weight$"), lambda m: "linear_attn.norm"),
    (re.compile(_L + r"mlp\.experts\.(gate_up|down)_proj$"), lambda m: "experts"),
    (re.compile(_L), lambda m: "other"),
    (re.compile(r"cross_layers\.(\d+)\."), lambda m: "cross"),
    (re.compile(r"norm\.weight$"), lambda m: "norm"),
    (re.compile(r"embed_tokens\.weight$"), lambda m: "embed"),
    (re.compile(r"lm_head\.weight$"), lambda m: "lm_head"),
]
_EXPERT = re.compile(_L + r"mlp\.experts\.(\d+)\.")
_LAYER = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """What one key is: its role, canonical text-tower name, layer index and module kind.

    ``kind`` is a :data:`KINDS` entry or one of the groups ``norm embed lm_head router cross other``, or
    ``experts`` for a stored fused expert tensor (which holds many canonical tensors: see :func:`text_parts`);
    ``group`` is the part before the dot. ``expert`` is the expert index of a per-expert tensor. Non-text
    keys have ``canonical``, ``layer`` and ``kind`` set to None.
    """

    key: str
    role: str
    canonical: str | None = None
    layer: int | None = None
    kind: str | None = None
    expert: int | None = None

    @property
    def group(self) -> str | None:
        return self.kind.split(".")[0] if self.kind else None

    @property
    def is_bias(self) -> bool:
        return self.key.endswith(".bias")


def classify_canonical(canonical: str) -> tuple[int | None, str]:
    """Layer index and module kind of a canonical text-tower name (MLLM-only ``cross_layers`` have no layer)."""
    for pattern, kind in _KINDS:
        m = pattern.match(canonical)
        if m:
            layer = int(m.group(1)) if pattern.pattern.startswith("layers") else None
            return layer, kind(m)
    return None, "other"


def expert_index(canonical: str) -> int | None:
    """The expert index of a per-expert canonical name (``layers.3.mlp.experts.7.up_proj.weight`` -> 7)."""
    m = _EXPERT.match(canonical)
    return int(m.group(2)) if m else None


def classify_key(key: str, family: Family, cross: frozenset[int] = frozenset()) -> TensorInfo:
    """Map one checkpoint (or in-memory parameter) name to its :class:`TensorInfo` under ``family``.

    ``cross`` holds the model's MLLM-only layer indices (:func:`cross_layer_indices`): such a layer is
    named ``cross_layers.{i}.*``, and a later layer ``i`` becomes ``layers.{i - (cross layers before i)}``.
    """
    lay = family.layout
    candidates = [(p, "text") for p in lay.text] + [(p, "lm_head") for p in lay.lm_head]
    candidates += [(p, "vision") for p in lay.vision] + [(p, "projector") for p in lay.projector]
    best = max((c for c in candidates if key.startswith(c[0])), key=lambda c: len(c[0]), default=None)
    if best is None:
        return TensorInfo(key, "other")
    prefix, role = best
    if role in ("vision", "projector"):
        return TensorInfo(key, role)
    canonical = "lm_head." + key[len(prefix):] if role == "lm_head" else key[len(prefix):]
    if cross:
        m = _LAYER.match(canonical)
        if m:
            i = int(m.group(1))
            rest = canonical[m.end():]
            canonical = f"cross_layers.{i}.{rest}" if i in cross else f"layers.{i - sum(1 for c in cross if c < i)}.{rest}"
    layer, kind = classify_canonical(canonical)
    return TensorInfo(key, "text", canonical, layer, kind, expert_index(canonical))


def cross_layer_indices(family: Family, config: dict, keys: Iterable[str] = ()) -> frozenset[int]:
    """The MLLM-only layer indices of a model of ``family``: its config's ``cross_layers`` field, else the
    layers whose keys hold ``cross_attn``. Empty for families without such layers."""
    if family.cross_layers is None:
        return frozenset()
    for section in (config.get("text_config") or {}, config):
        if isinstance(section.get(family.cross_layers), list):
            return frozenset(int(i) for i in section[family.cross_layers])
    found = set()
    for k in keys:
        m = re.search(r"layers\.(\d+)\.cross_attn", k)
        if m:
            found.add(int(m.group(1)))
    return frozenset(found)


@dataclass(frozen=True)
class Part:
    """Where one canonical tensor lives: stored tensor ``key`` whole (``expert`` None), or rows
    ``[offset, offset + shape[0])`` of expert ``expert``'s matrix in a fused ``[E, ...]`` tensor.

    ``shape`` is the canonical tensor's shape (a Linear weight's ``[out, in]``); ``transposed`` means the
    fused tensor stores each expert's matrix as ``[in, out]``, so the part is columns there.
    """

    key: str
    shape: tuple[int, ...]
    expert: int | None = None
    offset: int = 0
    transposed: bool = False


def expert_parts(info: TensorInfo, shape: tuple[int, ...], layout: str) -> dict[str, Part]:
    """The canonical per-expert tensors held by a stored fused expert tensor (``info.kind == "experts"``).

    ``gate_up_proj`` holds each expert's ``gate_proj`` (rows ``[0, I)``) and ``up_proj`` (rows ``[I, 2I)``),
    ``down_proj`` its ``down_proj``; ``layout`` is ``fused`` ([E, 2I, H] / [E, H, I]) or ``fused_transposed``
    ([E, H, 2I] / [E, I, H]).
    """
    if layout not in ("fused", "fused_transposed") or len(shape) != 3:
        raise FamilyError(f"{info.key}: a fused expert tensor of shape {list(shape)} cannot be read as {layout!r} experts")
    transposed = layout == "fused_transposed"
    experts, first, second = shape
    rows, cols = (second, first) if transposed else (first, second)
    base = info.canonical.rsplit(".mlp.experts.", 1)[0] + ".mlp.experts"
    if info.canonical.endswith("gate_up_proj"):
        if rows % 2:
            raise FamilyError(f"{info.key}: fused gate_up_proj of shape {list(shape)} has an odd gate+up size {rows}")
        half = rows // 2
        return {f"{base}.{j}.{name}_proj.weight": Part(info.key, (half, cols), j, off, transposed)
                for j in range(experts) for name, off in (("gate", 0), ("up", half))}
    return {f"{base}.{j}.down_proj.weight": Part(info.key, (rows, cols), j, 0, transposed) for j in range(experts)}


def fused_layout(gate_up: tuple[int, ...], down: tuple[int, ...], where: str) -> str:
    """``fused`` or ``fused_transposed``, from the shapes of one layer's fused ``gate_up_proj`` and ``down_proj``.

    Both layouts are in use under the same key names: transformers 5 holds ([E, 2I, H], [E, H, I]) in
    memory and saves that for a model it built, while Qwen3-VL-MoE's published checkpoints (and
    transformers 5's re-save of them) hold ([E, H, 2I], [E, I, H]). The two shapes together tell them
    apart whatever the sizes (``2I == H`` included), with no config needed.
    """
    if len(gate_up) == 3 and len(down) == 3 and gate_up[0] == down[0]:
        if gate_up[1] == 2 * down[2] and gate_up[2] == down[1]:
            return "fused"
        if gate_up[2] == 2 * down[1] and gate_up[1] == down[2]:
            return "fused_transposed"
    raise FamilyError(f"{where}: fused experts gate_up_proj {list(gate_up)} and down_proj {list(down)} fit neither "
                      f"[E, 2I, H] / [E, H, I] nor [E, H, 2I] / [E, I, H]")


def text_parts(infos: Iterable[TensorInfo], shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, Part]:
    """Canonical text-tower name -> :class:`Part` for classified keys (on disk, or in-memory parameter names).

    ``shapes`` gives each text key's stored shape; a layer's fused expert tensors are read in the layout
    their shapes show (:func:`fused_layout`). Two keys holding one canonical name is a
    :class:`FamilyError` naming ``where``.
    """
    text: dict[str, Part] = {}
    for info in infos:
        if info.role != "text":
            continue
        if info.kind == "experts":
            gate_up = info.key.replace("experts.down_proj", "experts.gate_up_proj")
            down = info.key.replace("experts.gate_up_proj", "experts.down_proj")
            if gate_up not in shapes or down not in shapes:
                raise FamilyError(f"{where}: {info.key} has no fused {'down_proj' if down not in shapes else 'gate_up_proj'} beside it")
            parts = expert_parts(info, shapes[info.key], fused_layout(shapes[gate_up], shapes[down], f"{where}: {info.key}"))
        else:
            parts = {info.canonical: Part(info.key, tuple(shapes[info.key]))}
        for name, part in parts.items():
            if name in text:
                raise FamilyError(f"{where}: keys {text[name].key!r} and {info.key!r} both hold {name!r}")
            text[name] = part
    return text


def get_family(name: str) -> Family:
    """The family called ``name``; a :class:`FamilyError` listing the known ones otherwise."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise FamilyError(f"unknown family {name!r}; known: {', '.join(FAMILY_NAMES)}")


def _key_score(f: Family, keys: list[str]) -> tuple[int, int, int]:
    infos = [classify_key(k, f) for k in keys]
    layered = sum(1 for i in infos if i.layer is not None)
    vision = sum(1 for i in infos if i.role in ("vision", "projector"))
    other = sum(1 for i in infos if i.role == "other")
    return layered, vision, -other


def detect_family(config: dict, keys: Iterable[str] = ()) -> Family:
    """Find the family from ``config.json``'s ``model_type``, then ``architectures``, then the key names.

    Keys alone often fit several families equally (qwen2_vl and qwen2_5_vl have the same layout; so do
    every text-only LLM's): that is a :class:`FamilyError` asking for ``--family``, never a guess.
    """
    mt = config.get("model_type")
    for f in FAMILIES:
        if mt in f.model_types:
            return f
    archs = set(config.get("architectures") or ())
    for f in FAMILIES:
        if archs & set(f.architectures):
            return f
    keys = list(keys)
    what = f"model_type {mt!r}" if mt else "no model_type"
    if keys:
        scored = [(_key_score(f, keys), f) for f in FAMILIES]
        best = max(s for s, _ in scored)
        tied = [f for s, f in scored if s == best]
        layered, vision, _ = best
        if layered and (vision or not tied[0].multimodal):
            if len(tied) == 1:
                return tied[0]
            raise FamilyError(f"cannot tell the model family ({what}): the keys fit {', '.join(f.name for f in tied)} "
                              f"equally; pass --family")
    raise FamilyError(f"cannot tell the model family ({what}); pass --family, one of: {', '.join(FAMILY_NAMES)}")


def tie_word_embeddings(config: dict) -> bool | None:
    """Whether the config ties ``lm_head`` to ``embed_tokens`` (top level, else ``text_config``); None when it does not say."""
    text = config.get("text_config") or {}
    for section in (config, text):
        if section.get("tie_word_embeddings") is not None:
            return bool(section["tie_word_embeddings"])
    return None
