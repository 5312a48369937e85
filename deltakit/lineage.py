"""Lineage: can two checkpoints' text towers descend from one base model?

Before a command works on a pair (``diff``, ``merge``, ``prior``), :func:`check_lineage` compares the two
text architectures read from ``config.json`` (:func:`text_architecture`) and, when they cannot share a
base, says in one line what differs (``hidden_size 3584 vs 4096, attention biases yes vs no``) instead of
failing later on a missing ``k_proj.bias``. Differences that do not stop the towers from pairing tensor by
tensor (vocabulary size, rope theta, tied embeddings) are returned as notes. After ``diff``,
:func:`unrelated_warning` flags a pair whose weights show they were never one model.

Torch-free and transformers-free: it reads plain config dicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from deltakit.errors import IncompatibleError
from deltakit.families import Family

_TEXT_SECTIONS = ("text_config", "llm_config")
"""Where an MLLM's config keeps its text tower (``llm_config``: OpenGVLab's original InternVL configs)."""
_BIASED_TEXT_TYPES = frozenset({"qwen2"})
"""Text types whose q/k/v projections carry biases though their configs have no ``attention_bias`` field."""
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_SOFTMAX_ATTENTION = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
"""Layer types with the same weights (q/k/v/o projections); they differ only in the attention window."""

UNRELATED_COSINE = 0.2
"""Median per-layer cosine below which (in absolute value) two checkpoints were never one model: see
:func:`unrelated_warning`."""


@dataclass(frozen=True)
class TextArchitecture:
    """The shape-defining facts of a text tower, as its config states them (None: the config does not say).

    ``num_layers`` counts the decoder layers that pair with an LLM's: an MLLM's own cross-attention layers
    (``Family.cross_layers``, Llama-3.2-Vision) are left out and counted in ``cross_layers``.
    ``layer_types`` is the per-layer attention pattern (Qwen3.5's linear/full hybrid, Gemma-3's
    sliding/full), over the paired layers. ``text_type`` is the family's text type (``qwen2``, ``llama``...).
    """

    hidden_size: int | None
    num_layers: int | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    intermediate_size: int | None
    moe_intermediate_size: int | None
    num_experts: int | None
    vocab_size: int | None
    rope_theta: float | None
    attention_bias: bool
    tied: bool | None
    layer_types: tuple[str, ...] | None = None
    cross_layers: int = 0
    text_type: str = ""


class Comparison(NamedTuple):
    """What differs between two text architectures: ``blocking`` (they cannot share a base) and ``notes``
    (they can still pair tensor by tensor). Unpacks as ``blocking, notes = compare(a, b)``."""

    blocking: list[str]
    notes: list[str]

    @property
    def compatible(self) -> bool:
        return not self.blocking


def _sections(config: dict) -> tuple[dict, ...]:
    """The text section (``text_config``/``llm_config``) first, then the top level."""
    for key in _TEXT_SECTIONS:
        section = config.get(key)
        if isinstance(section, dict) and section:
            return section, config
    return (config,)


def _get(sections: tuple[dict, ...], *keys: str) -> Any:
    for section in sections:
        for key in keys:
            if section.get(key) is not None:
                return section[key]
    return None


def _int(value: Any) -> int | None:
    return None if value is None or isinstance(value, bool) else int(value)


def _theta_of(value: Any) -> float | None:
    """``rope_theta`` of a ``rope_parameters``/``rope_scaling`` dict: flat, or per layer type
    (transformers 5's Gemma-3: ``{"full_attention": {...}, "sliding_attention": {...}}``, where the
    full-attention theta is the one a legacy config calls ``rope_theta``)."""
    if not isinstance(value, dict):
        return None
    if value.get("rope_theta") is not None:
        return value["rope_theta"]
    full = value.get("full_attention")
    if isinstance(full, dict) and full.get("rope_theta") is not None:
        return full["rope_theta"]
    nested = [v for v in value.values() if isinstance(v, dict) and v.get("rope_theta") is not None]
    return nested[0]["rope_theta"] if nested else None


def _rope_theta(sections: tuple[dict, ...]) -> float | None:
    for section in sections:
        if section.get("rope_theta") is not None:
            return section["rope_theta"]
        for key in ("rope_parameters", "rope_scaling"):
            theta = _theta_of(section.get(key))
            if theta is not None:
                return theta
    return None


def _tied(config: dict, sections: tuple[dict, ...]) -> bool | None:
    """``tie_word_embeddings`` at the top level (what governs an MLLM's own lm_head), else in the text section."""
    for section in (config, *sections):
        if section.get("tie_word_embeddings") is not None:
            return bool(section["tie_word_embeddings"])
    return None


def text_architecture(config: dict, family: Family) -> TextArchitecture:
    """The :class:`TextArchitecture` of a ``config.json`` dict of ``family``.

    Every field is read from the text section (``text_config``, when present) and then the top level;
    a field neither states is None (no transformers default is assumed), except ``attention_bias``:
    the config's ``attention_bias`` when set, else True for Qwen2-type text towers (their configs have
    no such field but q/k/v always carry biases) and False for every other family.
    """
    sections = _sections(config)
    layers = _int(_get(sections, "num_hidden_layers"))
    cross: frozenset[int] = frozenset()
    if family.cross_layers:
        listed = _get(sections, family.cross_layers)
        if isinstance(listed, (list, tuple)):
            cross = frozenset(int(i) for i in listed if layers is None or 0 <= int(i) < layers)
    hidden = _int(_get(sections, "hidden_size"))
    heads = _int(_get(sections, "num_attention_heads"))
    head_dim = _int(_get(sections, "head_dim"))
    if head_dim is None and hidden is not None and heads:
        head_dim = hidden // heads
    experts = _int(_get(sections, *_EXPERT_KEYS)) or None
    bias = _get(sections, "attention_bias")
    text_type = family.text_type_of(config)
    attention_bias = bool(bias) if bias is not None else text_type in _BIASED_TEXT_TYPES
    types = _get(sections, "layer_types")
    layer_types = None
    if isinstance(types, (list, tuple)):
        layer_types = tuple(str(t) for i, t in enumerate(types) if not (cross and len(types) == layers and i in cross))
    return TextArchitecture(
        hidden_size=hidden,
        num_layers=None if layers is None else layers - len(cross),
        num_heads=heads,
        num_kv_heads=_int(_get(sections, "num_key_value_heads")),
        head_dim=head_dim,
        intermediate_size=_int(_get(sections, "intermediate_size")),
        moe_intermediate_size=_int(_get(sections, "moe_intermediate_size")) if experts else None,
        num_experts=experts,
        vocab_size=_int(_get(sections, "vocab_size")),
        rope_theta=_rope_theta(sections),
        attention_bias=attention_bias,
        tied=_tied(config, sections),
        layer_types=layer_types,
        cross_layers=len(cross),
        text_type=text_type,
    )


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _differs(label: str, x: Any, y: Any, out: list[str]) -> None:
    """Append ``"label x vs y"`` when both are known and differ (a field one config leaves out is not compared)."""
    if x is not None and y is not None and x != y:
        out.append(f"{label} {_fmt(x)} vs {_fmt(y)}")


def _layers(arch: TextArchitecture) -> str:
    return f"{arch.num_layers} (+{arch.cross_layers} cross-attention)" if arch.cross_layers else str(arch.num_layers)


def _layer_types(a: TextArchitecture, b: TextArchitecture, blocking: list[str], notes: list[str]) -> None:
    ta, tb = a.layer_types, b.layer_types
    if ta is None or tb is None or ta == tb:
        return
    if len(ta) != len(tb):
        if a.num_layers is None or b.num_layers is None:  # else the layer counts already differ
            blocking.append(f"layer types for {len(ta)} vs {len(tb)} layers")
        return

    def weights(t: str) -> str:
        return "attention" if t in _SOFTMAX_ATTENTION else t

    shaped = [i for i, (x, y) in enumerate(zip(ta, tb)) if weights(x) != weights(y)]
    differ = shaped or [i for i, (x, y) in enumerate(zip(ta, tb)) if x != y]
    i = differ[0]
    where = f"{len(differ)} of {len(ta)} layers (layer {i}: {ta[i]} vs {tb[i]})"
    if shaped:
        blocking.append(f"layer types differ at {where}")
    else:  # sliding vs full attention: same weights, a different attention window
        notes.append(f"attention windows differ at {where}")


def compare(a: TextArchitecture, b: TextArchitecture) -> Comparison:
    """What differs between two text towers, as short phrases (``"hidden_size 3584 vs 4096"``).

    ``blocking``: hidden size, heads, kv heads, head_dim, intermediate size, MoE intermediate size,
    experts, attention biases, layer types (linear vs softmax attention): any of these means the towers
    cannot descend from one base. ``notes``: the number of paired layers (a truncated or deepened model
    still pairs layer by layer on the layers both have, which diff reports and merge and prior refuse
    unless narrowed to them), vocabulary size (vocabularies overlap and pair on their common rows), rope
    theta (no weight changes shape), tied embeddings, sliding vs full
    attention windows, and different text types of equal shapes (``mistral`` vs ``llama``). A field
    either config leaves out (None) is not compared.
    """
    blocking: list[str] = []
    notes: list[str] = []
    _differs("hidden_size", a.hidden_size, b.hidden_size, blocking)
    if a.num_layers is not None and b.num_layers is not None and a.num_layers != b.num_layers:
        notes.append(f"layers {_layers(a)} vs {_layers(b)}")
    _differs("heads", a.num_heads, b.num_heads, blocking)
    _differs("kv heads", a.num_kv_heads, b.num_kv_heads, blocking)
    _differs("head_dim", a.head_dim, b.head_dim, blocking)
    _differs("intermediate_size", a.intermediate_size, b.intermediate_size, blocking)
    _differs("moe_intermediate_size", a.moe_intermediate_size, b.moe_intermediate_size, blocking)
    described = a.hidden_size is not None and b.hidden_size is not None  # else "no experts" may just be unsaid
    if described and (a.num_experts is None) != (b.num_experts is None):
        blocking.append(f"experts {a.num_experts or 'none (dense)'} vs {b.num_experts or 'none (dense)'}")
    else:
        _differs("experts", a.num_experts, b.num_experts, blocking)
    _differs("attention biases", a.attention_bias, b.attention_bias, blocking)
    _layer_types(a, b, blocking, notes)
    _differs("vocab_size", a.vocab_size, b.vocab_size, notes)
    _differs("rope_theta", a.rope_theta, b.rope_theta, notes)
    _differs("tied embeddings", a.tied, b.tied, notes)
    if a.text_type and b.text_type and a.text_type != b.text_type and not blocking:
        notes.append(f"text types {a.text_type} vs {b.text_type}")
    return Comparison(blocking, notes)


def check_lineage(config_a: dict, family_a: Family, config_b: dict, family_b: Family,
                  name_a: str = "A", name_b: str = "B") -> list[str]:
    """The notes on a pair whose text towers can share a base model (:func:`compare`); an
    :class:`~deltakit.errors.IncompatibleError` of one line naming every blocking difference otherwise."""
    result = compare(text_architecture(config_a, family_a), text_architecture(config_b, family_b))
    if result.blocking:
        raise IncompatibleError(
            f"{name_a} ({family_a.name}) and {name_b} ({family_b.name}) cannot share a base model: "
            f"{', '.join(result.blocking)}; they are different architectures, so diff/merge/prior on this pair "
            f"is meaningless")
    return result.notes


def unrelated_warning(median_layer_cosine: float, threshold: float = UNRELATED_COSINE) -> str | None:
    """A one-line warning when ``diff``'s median per-layer cosine says the two were never one model, else None.

    Why 0.2: weights trained from independent initialisations are, layer by layer, nearly orthogonal
    high-dimensional vectors; two unrelated random matrices of n entries have cosine ~N(0, 1/n), about
    0.0002 for a 4096 x 4096 projection, and a layer's cosine stays near 0 after training. The norm
    weights in a layer's sums are positive on both sides and lift it a little (a few hundredths at 7B
    sizes, where a layer's ~10^8 matrix entries dominate its ~10^4 norm entries), so the threshold is
    not set at noise level. Fine-tunes of one base stay well above 0.5: LLaVA/Idefics-like pairs at
    0.98-1.0, the paper's far Qwen pair (Qwen2.5-VL vs its LLM partner, Figure 2) at ~0.63-0.77. 0.2
    sits several noise widths above unrelated pairs and more than 0.4 below the farthest related pair
    seen. A NaN cosine (no finite layer) gives no warning: it says nothing about lineage.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    cos = float(median_layer_cosine)
    if not math.isfinite(cos) or abs(cos) >= threshold:
        return None
    return (f"median layer cosine {cos:.3f} is near 0 (|cos| < {threshold:g}): the two were never one model "
            f"(independently trained weights give cosine ~0, fine-tunes of one base stay above 0.5), so "
            f"merging them or moving a prior between them is meaningless")
