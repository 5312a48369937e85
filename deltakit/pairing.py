"""Match the text towers of two mapped checkpoints tensor by tensor, reporting whatever does not match."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltakit.errors import IncompatibleError
from deltakit.families import Part, classify_canonical, expert_index
from deltakit.lineage import check_lineage
from deltakit.model import EMBED, LM_HEAD, MappedCheckpoint

_VOCAB_KINDS = ("embed", "lm_head")


@dataclass(frozen=True)
class PairedTensor:
    """One canonical text-tower tensor present in both checkpoints.

    ``rows`` is set when the vocabularies differ (embeddings and lm_head only): compare rows
    ``[0, rows)``; the larger side's extra rows are reported in :attr:`Pairing.notes`.
    """

    canonical: str
    part_a: Part
    part_b: Part
    layer: int | None
    kind: str
    rows: int | None = None

    @property
    def group(self) -> str:
        return self.kind.split(".")[0]

    @property
    def key_a(self) -> str:
        return self.part_a.key

    @property
    def key_b(self) -> str:
        return self.part_b.key

    @property
    def shape_a(self) -> tuple[int, ...]:
        return self.part_a.shape

    @property
    def shape_b(self) -> tuple[int, ...]:
        return self.part_b.shape

    @property
    def expert(self) -> int | None:
        return expert_index(self.canonical)


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


def experts_per_layer(m: MappedCheckpoint) -> dict[int, int]:
    """MoE experts of each decoder layer of ``m`` (layers without experts left out)."""
    found: dict[int, set[int]] = {}
    for name in m.text:
        j = expert_index(name)
        if j is not None:
            found.setdefault(classify_canonical(name)[0], set()).add(j)
    return {layer: len(js) for layer, js in found.items()}


def pair(a: MappedCheckpoint, b: MappedCheckpoint) -> Pairing:
    """Match ``a`` and ``b`` by canonical name.

    First the lineage check (:func:`deltakit.lineage.check_lineage`): two text towers of different
    architectures cannot share a base, which is one :class:`IncompatibleError` line naming what differs.
    Raises it too if nothing matches, or if a layer has experts in both but not as many.
    """
    lineage = check_lineage(a.ckpt.config, a.family, b.ckpt.config, b.family, str(a.path), str(b.path))
    ea, eb = experts_per_layer(a), experts_per_layer(b)
    for layer in sorted(set(ea) & set(eb)):
        if ea[layer] != eb[layer]:
            raise IncompatibleError(f"layer {layer} has {ea[layer]} experts in {a.path} but {eb[layer]} in {b.path}; "
                                    f"experts pair one to one, so these models cannot be compared or merged")
    p = Pairing(a, b, notes=lineage)
    names_a = set(a.text) | ({LM_HEAD} if a.tied else set())
    names_b = set(b.text) | ({LM_HEAD} if b.tied else set())
    if a.tied and b.tied:
        names_a.discard(LM_HEAD)
        names_b.discard(LM_HEAD)
    for side, m in (("A", a), ("B", b)):
        if m.tied and LM_HEAD in names_a & names_b:
            p.notes.append(f"{side} ties lm_head to embed_tokens: its lm_head is compared through {m.text[EMBED].key}")
    for name in sorted(names_a & names_b, key=canonical_order):
        ka, kb = a.resolve(name), b.resolve(name)
        sa, sb = ka.shape, kb.shape
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
        p.matched.append(PairedTensor(name, ka, kb, layer, kind, rows))
    p.only_a = sorted(names_a - names_b, key=canonical_order)
    p.only_b = sorted(names_b - names_a, key=canonical_order)
    if not p.matched:
        raise IncompatibleError(
            f"{a.path} ({a.family.name}) and {b.path} ({b.family.name}) have no text-tower tensor in common"
        )
    return p


def canonical_order(name: str) -> tuple:
    """Sort key of canonical names: embeddings, then layer by layer (experts in index order), then the rest."""
    layer, _ = classify_canonical(name)
    j = expert_index(name)
    return (-1 if name == EMBED else 10**9 if layer is None else layer, j is not None, j or 0, name)
