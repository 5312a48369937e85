"""Match the text towers of two mapped checkpoints tensor by tensor, reporting whatever does not match."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltakit.errors import IncompatibleError
from deltakit.families import classify_canonical
from deltakit.model import EMBED, LM_HEAD, MappedCheckpoint

_VOCAB_KINDS = ("embed", "lm_head")


@dataclass(frozen=True)
class PairedTensor:
    """One canonical text-tower tensor present in both checkpoints.

    ``rows`` is set when the vocabularies differ (embeddings and lm_head only): compare rows
    ``[0, rows)``; the larger side's extra rows are reported in :attr:`Pairing.notes`.
    """

    canonical: str
    key_a: str
    key_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    layer: int | None
    kind: str
    rows: int | None = None

    @property
    def group(self) -> str:
        return self.kind.split(".")[0]


@dataclass
class Pairing:
    """The result of :func:`pair`: matched tensors and everything that did not match."""

    a: MappedCheckpoint
    b: MappedCheckpoint
    matched: list[PairedTensor] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def require_same_shapes(self) -> None:
        """Raise :class:`IncompatibleError` if any matched-by-name tensor differs in shape beyond vocab rows."""
        if self.shape_mismatch:
            name, sa, sb = self.shape_mismatch[0]
            raise IncompatibleError(
                f"{len(self.shape_mismatch)} text-tower tensors differ in shape, e.g. {name}: {list(sa)} vs {list(sb)}"
            )


def pair(a: MappedCheckpoint, b: MappedCheckpoint) -> Pairing:
    """Match ``a`` and ``b`` by canonical name. Raises :class:`IncompatibleError` if nothing matches."""
    p = Pairing(a, b)
    names_a = set(a.text) | ({LM_HEAD} if a.tied else set())
    names_b = set(b.text) | ({LM_HEAD} if b.tied else set())
    if a.tied and b.tied:
        names_a.discard(LM_HEAD)
        names_b.discard(LM_HEAD)
    for side, m in (("A", a), ("B", b)):
        if m.tied and LM_HEAD in names_a & names_b:
            p.notes.append(f"{side} ties lm_head to embed_tokens: its lm_head is compared through {m.text[EMBED]}")
    for name in sorted(names_a & names_b, key=canonical_order):
        ka, kb = a.resolve(name), b.resolve(name)
        sa, sb = a.ckpt.meta(ka).shape, b.ckpt.meta(kb).shape
        layer, kind = classify_canonical(name)
        rows = None
        if sa != sb:
            if kind in _VOCAB_KINDS and len(sa) == len(sb) and sa[1:] == sb[1:]:
                rows = min(sa[0], sb[0])
                bigger = "A" if sa[0] > sb[0] else "B"
                p.notes.append(
                    f"{name}: vocab differs (A {sa[0]} rows, B {sb[0]}); compared the first {rows}, {bigger} has {abs(sa[0] - sb[0])} extra rows"
                )
            else:
                p.shape_mismatch.append((name, sa, sb))
                continue
        p.matched.append(PairedTensor(name, ka, kb, sa, sb, layer, kind, rows))
    p.only_a = sorted(names_a - names_b, key=canonical_order)
    p.only_b = sorted(names_b - names_a, key=canonical_order)
    if not p.matched:
        raise IncompatibleError(
            f"{a.path} ({a.family.name}) and {b.path} ({b.family.name}) have no text-tower tensor in common"
        )
    return p


def canonical_order(name: str) -> tuple:
    """Sort key of canonical names: embeddings, then layer by layer, then the rest (norm, lm_head)."""
    layer, _ = classify_canonical(name)
    return (-1 if name == EMBED else 10**9 if layer is None else layer, name)
