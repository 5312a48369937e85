"""Model families: how each checkpoint layout names its text tower, vision tower and projector.

Every family maps its keys, on disk and in memory, to one canonical text-tower naming
(``embed_tokens.weight``, ``layers.{i}.self_attn.q_proj.weight``, ``layers.{i}.mlp.down_proj.weight``,
``norm.weight``, ``lm_head.weight``, ...). A family is data: a :class:`Layout` of key prefixes plus
the ``model_type``/``architectures`` values that identify it. Adding one is a new entry in
:data:`FAMILIES`, no new code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from deltakit.errors import FamilyError

ROLES = ("text", "vision", "projector", "other")
GROUPS = ("attn", "mlp", "norm", "embed", "lm_head", "other")


@dataclass(frozen=True)
class Layout:
    """Key prefixes of one checkpoint layout; within a key, the longest matching prefix wins."""

    text: tuple[str, ...]
    lm_head: tuple[str, ...] = ("lm_head.",)
    vision: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """A model family: its name, how to recognise it from ``config.json``, and its key layout."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layout: Layout
    multimodal: bool


CAUSAL_LM = Layout(text=("model.",))
# transformers < 4.52 and >= 5 save Qwen-VL as model.* / visual.*; 4.52-4.57 as model.language_model.* / model.visual.*.
QWEN_VL = Layout(
    text=("model.language_model.", "model."),
    vision=("model.visual.", "visual."),
    projector=("model.visual.merger.", "visual.merger."),
)
LLAVA = Layout(
    text=("model.language_model.", "language_model.model."),
    lm_head=("lm_head.", "language_model.lm_head."),
    vision=("model.vision_tower.", "vision_tower."),
    projector=("model.multi_modal_projector.", "multi_modal_projector.", "model.image_newline", "image_newline"),
)
IDEFICS = Layout(text=("model.text_model.",), vision=("model.vision_model.",), projector=("model.connector.",))

FAMILIES: tuple[Family, ...] = (
    Family("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), CAUSAL_LM, False),
    Family("llama", ("llama",), ("LlamaForCausalLM",), CAUSAL_LM, False),
    Family("mistral", ("mistral",), ("MistralForCausalLM",), CAUSAL_LM, False),
    Family("qwen2_vl", ("qwen2_vl",), ("Qwen2VLForConditionalGeneration",), QWEN_VL, True),
    Family("qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLForConditionalGeneration",), QWEN_VL, True),
    Family("llava", ("llava",), ("LlavaForConditionalGeneration",), LLAVA, True),
    Family("llava_next", ("llava_next",), ("LlavaNextForConditionalGeneration",), LLAVA, True),
    Family("idefics2", ("idefics2",), ("Idefics2ForConditionalGeneration",), IDEFICS, True),
    Family("idefics3", ("idefics3",), ("Idefics3ForConditionalGeneration",), IDEFICS, True),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)

_KINDS = [
    (re.compile(r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)$"), lambda m: f"attn.{m.group(2)}"),
    (re.compile(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$"), lambda m: f"mlp.{m.group(2)}"),
    (re.compile(r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$"), lambda m: "norm"),
    (re.compile(r"layers\.(\d+)\."), lambda m: "other"),
    (re.compile(r"norm\.weight$"), lambda m: "norm"),
    (re.compile(r"embed_tokens\.weight$"), lambda m: "embed"),
    (re.compile(r"lm_head\.weight$"), lambda m: "lm_head"),
]


@dataclass(frozen=True)
class TensorInfo:
    """What one key is: its role, canonical text-tower name, layer index and module kind.

    ``kind`` is one of ``attn.q attn.k attn.v attn.o mlp.gate mlp.up mlp.down norm embed lm_head
    other``; ``group`` is the part before the dot (``attn``, ``mlp``, ...). Non-text keys have
    ``canonical``, ``layer`` and ``kind`` set to None.
    """

    key: str
    role: str
    canonical: str | None = None
    layer: int | None = None
    kind: str | None = None

    @property
    def group(self) -> str | None:
        return self.kind.split(".")[0] if self.kind else None

    @property
    def is_bias(self) -> bool:
        return self.key.endswith(".bias")


def classify_canonical(canonical: str) -> tuple[int | None, str]:
    """Layer index and module kind of a canonical text-tower name."""
    for pattern, kind in _KINDS:
        m = pattern.match(canonical)
        if m:
            layer = int(m.group(1)) if pattern.pattern.startswith("layers") else None
            return layer, kind(m)
    return None, "other"


def classify_key(key: str, family: Family) -> TensorInfo:
    """Map one checkpoint (or in-memory parameter) name to its :class:`TensorInfo` under ``family``."""
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
    layer, kind = classify_canonical(canonical)
    return TensorInfo(key, "text", canonical, layer, kind)


def get_family(name: str) -> Family:
    """The family called ``name``; a :class:`FamilyError` listing the known ones otherwise."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise FamilyError(f"unknown family {name!r}; known: {', '.join(FAMILY_NAMES)}")


def detect_family(config: dict, keys: Iterable[str] = ()) -> Family:
    """Find the family from ``config.json`` (``model_type``, then ``architectures``), else from key names."""
    mt = config.get("model_type")
    for f in FAMILIES:
        if mt in f.model_types:
            return f
    archs = set(config.get("architectures") or ())
    for f in FAMILIES:
        if archs & set(f.architectures):
            return f
    keys = list(keys)
    if keys:
        scored = []
        for f in FAMILIES:
            infos = [classify_key(k, f) for k in keys]
            layered = sum(1 for i in infos if i.layer is not None)
            vision = sum(1 for i in infos if i.role in ("vision", "projector"))
            other = sum(1 for i in infos if i.role == "other")
            scored.append((layered, vision, -other, f))
        layered, vision, neg_other, best = max(scored, key=lambda s: s[:3])
        if layered and (vision or not best.multimodal):
            return best
    what = f"model_type {mt!r}" if mt else "no model_type"
    raise FamilyError(f"cannot tell the model family ({what}); pass --family, one of: {', '.join(FAMILY_NAMES)}")


def tie_word_embeddings(config: dict) -> bool:
    """Whether the config ties ``lm_head`` to ``embed_tokens`` (top level or in ``text_config``)."""
    text = config.get("text_config") or {}
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    return bool(text.get("tie_word_embeddings", False))
