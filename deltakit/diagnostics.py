"""``diff``: how far apart two checkpoints' text towers are in parameter space (the paper's Figure 2).

For every tensor matched by :func:`deltakit.pairing.pair` the stream accumulates ``A.B``, ``|A|^2``,
``|B|^2`` and ``|A-B|^2`` block by block straight from the files (float32 products summed column-wise,
columns in float64: :func:`deltakit.engine.sums.dot64`, ~1e-8 relative or better). Cosines
and L2 distances per tensor, per layer (all matched tensors of a layer as one vector), per module kind
and for the whole text tower all follow from those sums, so the data is read exactly once.

Speed: the pairs run on the streaming engine (:mod:`deltakit.engine`): row blocks are read with
``pread`` (no page faults, nothing stays mapped) into per-thread buffers, converted to float32 and
reduced with four row-partial dot products; several threads overlap reads and math (torch releases the
GIL), so the peak memory is a few block buffers whatever the model size.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from deltakit.engine.executor import Block, Job, Read, default_threads, execute, whole_rows
from deltakit.engine.selection import MODULE_GROUPS, Selection, SelectionError
from deltakit.engine.sums import Summed, dot64, sq64
from deltakit.families import KINDS, Family
from deltakit.lineage import unrelated_warning
from deltakit.model import MappedCheckpoint, open_model
from deltakit.pairing import PairedTensor, Pairing, pair
from deltakit.progress import ProgressFn, no_progress

BLOCK_ELEMENTS = 1 << 18
"""Elements per row block: 1 MB float32 buffers, large enough that per-block overhead is small, small enough to stay in cache."""
ALL = Selection(MODULE_GROUPS)
"""The default selection of :func:`diff`: every matched text-tower tensor."""

# Verdict thresholds on the median per-layer cosine; see docs/diff.md for the justification from Figure 2
# (LLaVA/Idefics pairs: 0.98-1.0, merge well; Qwen pairs: 0.63-0.77, merging hurts).
CLOSE_COSINE = 0.95
FAR_COSINE = 0.85
# The relative L2 |A-B|/|A| that the same cosines give for equal norms, sqrt(2 - 2 cos): 0.316 and 0.548.
CLOSE_REL_L2 = math.sqrt(2 - 2 * CLOSE_COSINE)
FAR_REL_L2 = math.sqrt(2 - 2 * FAR_COSINE)

KIND_ORDER = KINDS[:KINDS.index("shared.gate")] + ("router",) + KINDS[KINDS.index("shared.gate"):] + (
    "norm", "embed", "lm_head", "cross", "other")

VERDICTS = {
    "close": "close: naive merging is likely safe",
    "moderate": "moderate: naive merging may work, compare it with DRIFT",
    "far": "far: naive merging is likely to hurt, prefer DRIFT",
}


@dataclass
class Sums(Summed):
    """Float64 sums of one vector pair: ``A.B``, ``|A|^2``, ``|B|^2``, ``|A-B|^2`` and the element count."""

    dot: float = 0.0
    aa: float = 0.0
    bb: float = 0.0
    dd: float = 0.0
    numel: int = 0

    def stats(self) -> "Stats":
        na, nb = math.sqrt(self.aa), math.sqrt(self.bb)
        cos = self.dot / (na * nb) if na > 0 and nb > 0 else math.nan
        l2 = math.sqrt(max(self.dd, 0.0))
        return Stats(cosine=cos, l2=l2, norm_a=na, norm_b=nb, rel_l2=l2 / na if na > 0 else math.nan, numel=self.numel)


@dataclass(frozen=True)
class Stats:
    """cosine(A, B), L2 = |A-B|, |A|, |B| and relative L2 = |A-B|/|A| of one vector pair (NaN when undefined)."""

    cosine: float
    l2: float
    norm_a: float
    norm_b: float
    rel_l2: float
    numel: int


@dataclass(frozen=True)
class TensorDiff:
    """One matched tensor: its names in both checkpoints, what was compared, its stats, non-finite counts."""

    canonical: str
    key_a: str
    key_b: str
    layer: int | None
    kind: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    rows_compared: int | None
    stats: Stats
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    expert: int | None = None

    @property
    def finite(self) -> bool:
        return self.nonfinite_a == 0 and self.nonfinite_b == 0


@dataclass
class DiffReport:
    """Everything :func:`diff` found; :meth:`to_dict` is the JSON schema documented in docs/diff.md."""

    a: str
    b: str
    family_a: str
    family_b: str
    tensors: list[TensorDiff]
    layers: dict[int, Stats]
    kinds: dict[str, Stats]
    overall: Stats
    experts: dict[tuple[int, int], Stats]
    median_layer_cosine: float
    median_layer_l2: float
    median_layer_rel_l2: float
    verdict: str
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0

    @property
    def verdict_text(self) -> str:
        return VERDICTS[self.verdict]

    def to_dict(self) -> dict:
        return {
            "a": {"path": self.a, "family": self.family_a},
            "b": {"path": self.b, "family": self.family_b},
            "summary": {
                "verdict": self.verdict,
                "verdict_text": self.verdict_text,
                "median_layer_cosine": self.median_layer_cosine,
                "median_layer_l2": self.median_layer_l2,
                "median_layer_rel_l2": self.median_layer_rel_l2,
                "thresholds": {"close_cosine": CLOSE_COSINE, "far_cosine": FAR_COSINE,
                               "close_rel_l2": CLOSE_REL_L2, "far_rel_l2": FAR_REL_L2},
                "overall": asdict(self.overall),
                "matched_tensors": len(self.tensors),
                "nonfinite_tensors": [t.canonical for t in self.tensors if not t.finite],
                "seconds": self.seconds,
                "bytes_read": self.bytes_read,
            },
            "layers": [{"layer": i, **asdict(s)} for i, s in sorted(self.layers.items())],
            "kinds": [{"kind": k, **asdict(s)} for k, s in self.kinds.items()],
            "experts": [{"layer": i, "expert": j, **asdict(s)} for (i, j), s in sorted(self.experts.items())],
            "tensors": [tensor_record(t) for t in self.tensors],
            "only_a": self.only_a,
            "only_b": self.only_b,
            "shape_mismatch": [{"canonical": n, "shape_a": list(sa), "shape_b": list(sb)} for n, sa, sb in self.shape_mismatch],
            "notes": self.notes,
            "warnings": self.warnings,
        }


def tensor_record(t: TensorDiff) -> dict:
    """The flat per-tensor record shared by the JSON and CSV outputs."""
    return {
        "canonical": t.canonical, "key_a": t.key_a, "key_b": t.key_b, "layer": t.layer, "kind": t.kind, "expert": t.expert,
        "shape_a": list(t.shape_a), "shape_b": list(t.shape_b), "rows_compared": t.rows_compared,
        **asdict(t.stats), "nonfinite_a": t.nonfinite_a, "nonfinite_b": t.nonfinite_b,
    }


def verdict(median_cosine: float, median_rel_l2: float) -> str:
    """``close``, ``moderate`` or ``far`` from the median per-layer cosine and relative L2 (module thresholds)."""
    if not (median_cosine >= FAR_COSINE) or median_rel_l2 > FAR_REL_L2:
        return "far"
    if median_cosine >= CLOSE_COSINE and median_rel_l2 <= CLOSE_REL_L2:
        return "close"
    return "moderate"


# -- streaming ---------------------------------------------------------------------------------------------
def _reduce(block: Block) -> Sums:
    """One row block of a tensor pair -> :class:`Sums` (``A.B``, ``|A|^2``, ``|B|^2``, ``|A-B|^2`` by :func:`dot64`)."""
    va = block.read(0)
    vb = block.read(1)
    d = va - vb
    return Sums(dot64(va, vb), sq64(va), sq64(vb), sq64(d), va.numel())


def _extent(p: PairedTensor) -> tuple[int, int]:
    """Rows compared and elements per row of a matched tensor (a scalar is one row of one)."""
    rows = p.rows if p.rows is not None else (p.shape_a[0] if p.shape_a else 1)
    return rows, math.prod(p.shape_a[1:]) if p.shape_a else 1


def plan_diff(pairing: Pairing, selection: Selection = ALL) -> list[Job]:
    """One job per selected matched tensor: both sides read in float32, reduced to :class:`Sums` per block."""
    jobs = []
    for p in pairing.matched:
        if selection(p.canonical):
            rows, per_row = _extent(p)
            reads = (Read.of(pairing.a.ckpt, p.part_a, torch.float32), Read.of(pairing.b.ckpt, p.part_b, torch.float32))
            jobs.append(Job(p.canonical, reads, 0, rows, per_row, _reduce, block_rows=whole_rows(reads)))
    if not jobs:
        raise SelectionError(f"no matched text-tower tensor is selected by modules {','.join(selection.modules)} with this layer/name filter")
    return jobs


def _count_nonfinite(jobs: list[Job], threads: int) -> list[tuple[int, int]]:
    """NaN/Inf counts of both sides of each job's tensor pair, streamed again through the engine."""
    def count(block: Block) -> tuple[int, int]:
        return tuple(int((~torch.isfinite(block.read(i))).sum()) for i in (0, 1))

    recount = [Job(j.name, j.reads, j.start, j.stop, j.row_elements, count, block_rows=j.block_rows) for j in jobs]
    return [tuple(map(sum, zip(*blocks))) for blocks in execute(recount, threads=threads, description="diff: NaN/Inf")]


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def diff(
    a: str | os.PathLike | MappedCheckpoint,
    b: str | os.PathLike | MappedCheckpoint,
    family_a: str | Family | None = None,
    family_b: str | Family | None = None,
    allow_pickle: bool = False,
    progress: ProgressFn = no_progress,
    threads: int | None = None,
    selection: Selection = ALL,
    block_elements: int = BLOCK_ELEMENTS,
) -> DiffReport:
    """Compare the text towers of checkpoints ``a`` (usually the MLLM) and ``b`` (usually the LLM), streaming.

    ``a`` and ``b`` are folders (or ``.safetensors`` files), opened and closed here, or already opened
    models; ``selection`` narrows the compared tensors (default: every matched one). Raises
    :class:`~deltakit.errors.DeltakitError` subclasses for unreadable checkpoints, unknown families and
    pairs with no text-tower tensor in common. Tensors with NaN/Inf are reported (a warning naming them,
    ``nonfinite_a``/``nonfinite_b`` in their records) and left out of the layer, kind and overall figures.
    """
    t0 = time.perf_counter()
    with contextlib.ExitStack() as opened:
        models = []
        for src, family in ((a, family_a), (b, family_b)):
            if isinstance(src, MappedCheckpoint):
                models.append(src)
            else:
                models.append(open_model(src, family, allow_pickle=allow_pickle))
                opened.callback(models[-1].ckpt.close)
        report = _diff(*models, selection=selection, progress=progress, threads=threads or default_threads(),
                       block_elements=block_elements)
    report.seconds = time.perf_counter() - t0
    return report


def _diff(ma: MappedCheckpoint, mb: MappedCheckpoint, selection: Selection, progress: ProgressFn, threads: int,
          block_elements: int) -> DiffReport:
    pairing = pair(ma, mb)
    jobs = plan_diff(pairing, selection)
    blocks = execute(jobs, threads=threads, block_elements=block_elements, progress=progress, description="diff")
    sums = [Sums.total(per_block) for per_block in blocks]
    by_name = {t.canonical: t for t in pairing.matched}
    bad = [i for i, s in enumerate(sums) if not all(math.isfinite(v) for v in (s.dot, s.aa, s.bb, s.dd))]
    counts = dict(zip(bad, _count_nonfinite([jobs[i] for i in bad], threads))) if bad else {}

    tensors: list[TensorDiff] = []
    warnings: list[str] = []
    bytes_read = 0
    for i, (job, s) in enumerate(zip(jobs, sums)):
        p = by_name[job.name]
        bad_a, bad_b = counts.get(i, (0, 0))
        if i in counts:
            where = ", ".join(f"{n} NaN/Inf in {side} ({key})" for n, side, key in ((bad_a, "A", p.key_a), (bad_b, "B", p.key_b)) if n)
            warnings.append(f"{p.canonical}: {where}; left out of the layer, kind and overall figures")
        bytes_read += s.numel * (ma.ckpt.meta(p.key_a).dtype.itemsize + mb.ckpt.meta(p.key_b).dtype.itemsize)
        tensors.append(TensorDiff(p.canonical, p.key_a, p.key_b, p.layer, p.kind, p.shape_a, p.shape_b, p.rows,
                                  s.stats(), bad_a, bad_b, p.expert))

    layer_sums: dict[int, Sums] = {}
    kind_sums: dict[str, Sums] = {}
    expert_sums: dict[tuple[int, int], Sums] = {}
    overall = Sums()
    for t, s in zip(tensors, sums):
        if not t.finite:
            continue
        if t.layer is not None:
            layer_sums.setdefault(t.layer, Sums()).add(s)
        if t.expert is not None:
            expert_sums.setdefault((t.layer, t.expert), Sums()).add(s)
        kind_sums.setdefault(t.kind, Sums()).add(s)
        overall.add(s)
    layers = {i: s.stats() for i, s in sorted(layer_sums.items())}
    kinds = {k: kind_sums[k].stats() for k in KIND_ORDER if k in kind_sums}
    whole = overall.stats()
    if layers:
        med_cos = _median([s.cosine for s in layers.values()])
        med_rel = _median([s.rel_l2 for s in layers.values()])
    else:  # no layered tensor in common (e.g. embeddings only): judge the whole matched set
        med_cos, med_rel = whole.cosine, whole.rel_l2
    unrelated = unrelated_warning(med_cos)
    if unrelated:
        warnings.append(unrelated)
    return DiffReport(
        a=str(ma.path), b=str(mb.path), family_a=ma.family.name, family_b=mb.family.name, tensors=tensors,
        layers=layers, kinds=kinds, overall=whole, experts={k: v.stats() for k, v in expert_sums.items()},
        median_layer_cosine=med_cos,
        median_layer_l2=_median([s.l2 for s in layers.values()]), median_layer_rel_l2=med_rel,
        verdict=verdict(med_cos, med_rel), only_a=pairing.only_a, only_b=pairing.only_b,
        shape_mismatch=pairing.shape_mismatch, notes=pairing.notes, warnings=warnings, bytes_read=bytes_read,
    )
