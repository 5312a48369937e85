"""Which text-tower tensors a command works on: one vocabulary and one grammar for diff, merge and prior.

A :class:`Selection` keeps a canonical tensor (``layers.3.mlp.down_proj.weight``) when

- its module kind (``attn.q`` ... ``mlp.down``) or group (``attn mlp norm embed lm_head other``) is in
  ``modules``;
- it is outside the decoder layers (embeddings, final norm, lm_head), or its layer is in ``layers``
  (ranges ``"0:8,12:"``: ``START:END`` with END exclusive, either end may be empty, or one index) and
  not among the first ``skip_first``;
- it matches one of the ``include`` globs (when any are given) and none of the ``exclude`` globs
  (``fnmatch`` patterns on the canonical name, e.g. ``layers.*.self_attn.*.bias``).

The CLI flags (``--modules --layers --skip-first --include --exclude``) and the merge YAML keys
(``modules: layers: skip_first: include: exclude:``) all go through :meth:`Selection.parse`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deltakit.errors import DeltakitError
from deltakit.families import GROUPS, KINDS, classify_canonical

MODULE_GROUPS: tuple[str, ...] = GROUPS
MODULE_KINDS: tuple[str, ...] = KINDS
MODULES: tuple[str, ...] = MODULE_GROUPS + MODULE_KINDS
PRIOR_MODULES: tuple[str, ...] = tuple(m for m in MODULES if m not in ("other", "cross"))
"""Modules a prior may hold: every kind with a name (a prior tensor must map back onto a known parameter),
except the MLLM-only cross-attention layers, which no LLM has a counterpart for."""
DEFAULT_MODULES: dict[str, tuple[str, ...]] = {
    "diff": MODULE_GROUPS,
    "merge": ("attn", "mlp", "norm", "router", "shared", "linear_attn"),
    "prior": ("attn", "mlp"),
}
"""Each command's default ``modules``: diff compares every matched tensor; merge every weight of the paired
decoder layers (attention, MLP and MoE experts, norms, routers, shared experts, linear-attention state
parameters), not the embeddings or lm_head; prior the attention and MLP weights (the paper's D), which
covers MoE experts (``mlp.*`` with an expert index) and Qwen3.5's linear-attention projections
(``attn.qkv/z/a/b/out``) but not routers, shared experts or linear-attention convolution, decay and norm."""
LAYERS_HELP = "Layer ranges START:END (END exclusive, either end may be empty) or single indices, comma-separated, e.g. 0:8,20:."

LayerRanges = tuple[tuple[int, int | None], ...]


class SelectionError(DeltakitError):
    """A module list, layer range or name filter that cannot be parsed."""


def parse_modules(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"attn,mlp.down"`` (or a list) -> ``("attn", "mlp.down")``, checked against :data:`MODULES`."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    modules = tuple(str(m).strip() for m in items if str(m).strip())
    bad = [m for m in modules if m not in MODULES]
    if bad or not modules:
        raise SelectionError(f"unknown module {bad[0] if bad else '(none)'!r}; choose from {', '.join(MODULES)}")
    return modules


def parse_layers(spec: str | Sequence[Any] | None) -> LayerRanges | None:
    """``"0:8,12:"`` -> ``((0, 8), (12, None))``; ``"5"`` is layer 5; a list of ``[start, end]`` pairs or indices (YAML) too.

    None or an empty string means every layer.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    if not parts:
        raise SelectionError("layers: an empty list selects no layer; leave layers out to take every layer")
    ranges = []
    for part in parts:
        if isinstance(part, (list, tuple)):
            if len(part) != 2 or not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in part):
                raise SelectionError(f"bad layer range {list(part)!r}; use [start, end] (end exclusive, null for open)")
            a, b = (part[0] or 0), part[1]
        elif isinstance(part, int) and not isinstance(part, bool):
            a, b = part, part + 1
        else:
            start, sep, end = str(part).strip().partition(":")
            try:
                a = int(start) if start else 0
                b = (int(end) if end else None) if sep else a + 1
            except ValueError:
                raise SelectionError(f"bad layer range {part!r}; {LAYERS_HELP}") from None
        if a < 0 or (b is not None and b <= a):
            raise SelectionError(f"bad layer range {part!r}: empty or negative")
        ranges.append((a, b))
    return tuple(ranges)


def _patterns(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return tuple(str(p).strip() for p in items if str(p).strip())


@dataclass(frozen=True)
class Selection:
    """A set of canonical text-tower tensors, by module, layer and name (see the module docstring)."""

    modules: tuple[str, ...]
    layers: LayerRanges | None = None
    skip_first: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def parse(cls, modules: str | Sequence[str] = MODULE_GROUPS, layers: str | Sequence[Any] | None = None,
              skip_first: int = 0, include: str | Sequence[str] | None = None,
              exclude: str | Sequence[str] | None = None) -> "Selection":
        """Build from CLI strings or YAML values; any problem is one :class:`SelectionError` line."""
        if not isinstance(skip_first, int) or isinstance(skip_first, bool) or skip_first < 0:
            raise SelectionError(f"skip_first must be a non-negative integer, got {skip_first!r}")
        return cls(parse_modules(modules), parse_layers(layers), skip_first, _patterns(include), _patterns(exclude))

    def __call__(self, canonical: str) -> bool:
        """Whether the canonical tensor ``canonical`` is selected."""
        layer, kind = classify_canonical(canonical)
        if kind not in self.modules and kind.split(".")[0] not in self.modules:
            return False
        if layer is not None:
            if layer < self.skip_first:
                return False
            if self.layers is not None and not any(a <= layer and (b is None or layer < b) for a, b in self.layers):
                return False
        if self.include and not any(fnmatch.fnmatchcase(canonical, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(canonical, p) for p in self.exclude)

    @property
    def layers_text(self) -> str | None:
        """The layer ranges in the ``--layers`` grammar (None for all layers)."""
        if self.layers is None:
            return None
        return ",".join(f"{a}:{'' if b is None else b}" if b != a + 1 else str(a) for a, b in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """The selection as plain values (``layers`` as ``[start, end]`` pairs, ``end`` None when open)."""
        return {"modules": list(self.modules), "layers": [list(r) for r in self.layers] if self.layers is not None else None,
                "skip_first": self.skip_first, "include": list(self.include), "exclude": list(self.exclude)}
