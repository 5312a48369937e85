"""``diff``: how far apart two checkpoints' text towers are in parameter space (the paper's Figure 2).

For every tensor matched by :func:`deltakit.pairing.pair` the stream accumulates four float64 sums,
``A.B``, ``|A|^2``, ``|B|^2`` and ``|A-B|^2``, chunk by chunk straight from the files. Cosines
and L2 distances per tensor, per layer (all matched tensors of a layer as one vector), per module kind
and for the whole text tower all follow from those sums, so the data is read exactly once.

Speed: row chunks are read with ``pread`` (no page faults, nothing stays mapped) into per-thread
buffers, converted to float64 and reduced with four float64 dot products; several threads overlap
reads and math (torch releases the GIL), so the peak memory is a few chunk buffers whatever the model
size.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from deltakit.families import Family
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.reader import RowReader, single_threaded_torch
from deltakit.model import MappedCheckpoint, open_model
from deltakit.pairing import PairedTensor, pair
from deltakit.progress import ProgressFn, no_progress

CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk: 2 MB float64 buffers, large enough that per-chunk overhead is small, small enough to stay in cache."""

# Verdict thresholds on the median per-layer cosine; see docs/diff.md for the justification from Figure 2
# (LLaVA/Idefics pairs: 0.98-1.0, merge well; Qwen pairs: 0.63-0.77, merging hurts).
CLOSE_COSINE = 0.95
FAR_COSINE = 0.85
# The relative L2 |A-B|/|A| that the same cosines give for equal norms, sqrt(2 - 2 cos): 0.316 and 0.548.
CLOSE_REL_L2 = math.sqrt(2 - 2 * CLOSE_COSINE)
FAR_REL_L2 = math.sqrt(2 - 2 * FAR_COSINE)

KIND_ORDER = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "norm", "embed", "lm_head", "other")

VERDICTS = {
    "close": "close: naive merging is likely safe",
    "moderate": "moderate: naive merging may work, compare it with DRIFT",
    "far": "far: naive merging is likely to hurt, prefer DRIFT",
}


@dataclass
class Sums:
    """Float64 sums of one vector pair: ``A.B``, ``|A|^2``, ``|B|^2``, ``|A-B|^2`` and the element count."""

    dot: float = 0.0
    aa: float = 0.0
    bb: float = 0.0
    dd: float = 0.0
    numel: int = 0

    def add(self, other: "Sums") -> None:
        self.dot += other.dot
        self.aa += other.aa
        self.bb += other.bb
        self.dd += other.dd
        self.numel += other.numel

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
        "canonical": t.canonical, "key_a": t.key_a, "key_b": t.key_b, "layer": t.layer, "kind": t.kind,
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
@dataclass(frozen=True)
class _Chunk:
    index: int
    start: int
    stop: int


class _Reducer:
    """Reduces one row chunk of a tensor pair to :class:`Sums` (float64 copies read with ``pread``)."""

    def __init__(self, a: Checkpoint, b: Checkpoint, matched: list[PairedTensor], reader: RowReader):
        self.a, self.b, self.matched, self.reader = a, b, matched, reader
        self._local = threading.local()

    def __call__(self, c: _Chunk) -> Sums:
        p = self.matched[c.index]
        va = self.reader.read(self.a, p.key_a, c.start, c.stop, torch.float64, "a").reshape(-1)
        vb = self.reader.read(self.b, p.key_b, c.start, c.stop, torch.float64, "b").reshape(-1)
        n = va.numel()
        d = getattr(self._local, "d", None)
        if d is None or d.numel() < n:
            d = self._local.d = torch.empty(n, dtype=torch.float64)
        d = torch.sub(va, vb, out=d[:n])
        dot, aa, bb, dd = torch.stack([torch.dot(va, vb), torch.dot(va, va), torch.dot(vb, vb), torch.dot(d, d)]).tolist()
        return Sums(dot, aa, bb, dd, n)


def _extent(p: PairedTensor) -> tuple[int, int]:
    """Rows compared and elements per row of a matched tensor (a scalar is one row of one)."""
    rows = p.rows if p.rows is not None else (p.shape_a[0] if p.shape_a else 1)
    return rows, math.prod(p.shape_a[1:]) if p.shape_a else 1


def _chunks(matched: list[PairedTensor], chunk_elements: int) -> Iterator[_Chunk]:
    for i, p in enumerate(matched):
        rows, per_row = _extent(p)
        step = max(1, chunk_elements // max(per_row, 1))
        for start in range(0, rows, step):
            yield _Chunk(i, start, min(start + step, rows))


def _bounded_map(pool: ThreadPoolExecutor, fn, items: Iterator[_Chunk], window: int) -> Iterator[tuple[_Chunk, Sums]]:
    """``(item, fn(item))`` in order, with at most ``window`` items queued or running at a time."""
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def _count_nonfinite(ckpt: Checkpoint, key: str, rows: int | None) -> int:
    """How many NaN/Inf entries ``key`` has (in its first ``rows`` rows when given), read chunk by chunk."""
    bad = 0
    for start, view in ckpt.row_chunks(key, CHUNK_ELEMENTS):
        if rows is not None and start >= rows:
            break
        if rows is not None:
            view = view[: rows - start]
        bad += int((~torch.isfinite(view)).sum())
    return bad


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
    chunk_elements: int = CHUNK_ELEMENTS,
) -> DiffReport:
    """Compare the text towers of checkpoints ``a`` (usually the MLLM) and ``b`` (usually the LLM), streaming.

    ``a`` and ``b`` are folders (or ``.safetensors`` files), opened and closed here, or already opened
    models. Raises :class:`~deltakit.errors.DeltakitError` subclasses for unreadable checkpoints,
    unknown families and pairs with no text-tower tensor in common. Tensors with NaN/Inf are reported
    (a warning naming them, ``nonfinite_a``/``nonfinite_b`` in their records) and left out of the
    layer, kind and overall figures.
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
        report = _diff(*models, progress=progress, threads=threads or min(4, os.cpu_count() or 1),
                       chunk_elements=chunk_elements)
    report.seconds = time.perf_counter() - t0
    return report


def _diff(ma: MappedCheckpoint, mb: MappedCheckpoint, progress: ProgressFn, threads: int, chunk_elements: int) -> DiffReport:
    pairing = pair(ma, mb)
    matched = pairing.matched
    sums = [Sums() for _ in matched]
    reader = RowReader()
    reducer = _Reducer(ma.ckpt, mb.ckpt, matched, reader)
    progress(0, total=sum(math.prod(_extent(p)) for p in matched), description="diff")
    try:
        with single_threaded_torch(), ThreadPoolExecutor(threads, thread_name_prefix="deltakit-diff") as pool:
            for c, s in _bounded_map(pool, reducer, _chunks(matched, chunk_elements), 4 * threads):
                sums[c.index].add(s)
                progress(s.numel, info=matched[c.index].canonical)
    finally:
        reader.close()

    tensors: list[TensorDiff] = []
    warnings: list[str] = []
    bytes_read = 0
    for p, s in zip(matched, sums):
        bad_a = bad_b = 0
        if not all(math.isfinite(v) for v in (s.dot, s.aa, s.bb, s.dd)):
            bad_a = _count_nonfinite(ma.ckpt, p.key_a, p.rows)
            bad_b = _count_nonfinite(mb.ckpt, p.key_b, p.rows)
            where = ", ".join(f"{n} NaN/Inf in {side} ({key})" for n, side, key in ((bad_a, "A", p.key_a), (bad_b, "B", p.key_b)) if n)
            warnings.append(f"{p.canonical}: {where}; left out of the layer, kind and overall figures")
        bytes_read += s.numel * (ma.ckpt.meta(p.key_a).dtype.itemsize + mb.ckpt.meta(p.key_b).dtype.itemsize)
        tensors.append(TensorDiff(p.canonical, p.key_a, p.key_b, p.layer, p.kind, p.shape_a, p.shape_b, p.rows,
                                  s.stats(), bad_a, bad_b))

    layer_sums: dict[int, Sums] = {}
    kind_sums: dict[str, Sums] = {}
    overall = Sums()
    for t, s in zip(tensors, sums):
        if not t.finite:
            continue
        if t.layer is not None:
            layer_sums.setdefault(t.layer, Sums()).add(s)
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
    return DiffReport(
        a=str(ma.path), b=str(mb.path), family_a=ma.family.name, family_b=mb.family.name, tensors=tensors,
        layers=layers, kinds=kinds, overall=whole, median_layer_cosine=med_cos,
        median_layer_l2=_median([s.l2 for s in layers.values()]), median_layer_rel_l2=med_rel,
        verdict=verdict(med_cos, med_rel), only_a=pairing.only_a, only_b=pairing.only_b,
        shape_mismatch=pairing.shape_mismatch, notes=pairing.notes, warnings=warnings, bytes_read=bytes_read,
    )
