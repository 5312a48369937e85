"""The benchmark machinery: items, the :class:`Benchmark` base class, loading, scoring and the report.

A benchmark is one module under ``deltakit/benchmarks/`` with one :class:`Benchmark` subclass (its reader:
rows -> :class:`Item`; its prompt; its scorer, ported from the official code), listed in
:data:`~deltakit.benchmarks.registry.BENCHMARKS`. :func:`load` reads a file (parquet, JSON, JSONL, VLMEvalKit
TSV), detects the benchmark from its columns (or takes ``format``) and returns the items; :func:`score`
scores predictions made anywhere into a :class:`ScoreReport`.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from deltakit.benchmarks.files import Image, read_rows
from deltakit.benchmarks.registry import BENCHMARKS
from deltakit.data import DataError


@dataclass
class Item:
    """One question: what the prompt, the scorer and the per-category tables need."""

    id: str
    question: str
    answer: str
    prompt: str
    images: list[Image] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    where: str = ""


@dataclass(frozen=True)
class Scored:
    """One prediction scored: the extracted answer (None: nothing usable), the official verdict and the lenient one."""

    extracted: str | None
    correct: bool
    lenient: bool | None = None


class Benchmark(ABC):
    """A benchmark's reader and scorer. Subclasses set the class attributes and implement :meth:`item` and :meth:`score`."""

    name: ClassVar[str]
    title: ClassVar[str]
    official: ClassVar[str]
    """The official source files the scorer ports (repository and path)."""
    approximation: ClassVar[str | None] = None
    """Set when the official scorer calls a GPT judge: what replaces it here (shown in every output)."""
    id_fields: ClassVar[tuple[str, ...]] = ("id",)

    def __init__(self) -> None:
        self.repairs: list[dict[str, str]] = []

    @classmethod
    @abstractmethod
    def detect(cls, columns: set[str]) -> bool:
        """Whether a file with these columns is this benchmark."""

    def id_of(self, rec: dict[str, Any], where: str) -> str:
        """The record's id: the first of :attr:`id_fields` it has (a VLMEvalKit ``index`` also counts)."""
        for key in (*self.id_fields, "index", "_key"):
            if rec.get(key) not in (None, ""):
                return str(rec[key])
        raise DataError(f"{where}: no id field ({', '.join(self.id_fields)}, index)")

    @abstractmethod
    def item(self, rec: dict[str, Any], base: Path, where: str) -> Item:
        """One row of the published file as an :class:`Item`."""

    @abstractmethod
    def score(self, item: Item, prediction: str, lenient: bool = False) -> Scored:
        """The official verdict on a raw model output, and with ``lenient`` deltakit's lenient one."""

    def metrics(self, items: list[Item], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Benchmark-specific figures beyond accuracy (We-Math's four dimensions); none by default."""
        return {}


def get(name: str) -> Benchmark:
    """A fresh instance of the benchmark registered as ``name``."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark format {name!r}; expected one of {', '.join(BENCHMARKS)}")
    module, cls = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def detect(rows: list[dict[str, Any]], path: Path) -> Benchmark:
    """The benchmark whose schema the rows follow (columns of the first row)."""
    columns = set(rows[0])
    for name in BENCHMARKS:
        bench = get(name)
        if bench.detect(columns):
            return bench
    raise DataError(f"{path}: cannot tell which benchmark this is from its columns ({', '.join(sorted(columns)[:12])}); "
                    f"name it with --format ({', '.join(BENCHMARKS)})")


def load(path: str | os.PathLike, format: str | None = None, limit: int | None = None) -> tuple[Benchmark, list[Item]]:
    """The benchmark (``format``, or detected) and its first ``limit`` items (all when None) of the file at ``path``."""
    path = Path(path)
    rows = read_rows(path)
    bench = get(format) if format else detect([r for r, _ in rows], path)
    base = path if path.is_dir() else path.parent
    items, seen = [], set()
    for rec, where in rows:
        if limit is not None and len(items) >= limit:
            break
        it = bench.item(rec, base, where)
        if it.id in seen:
            raise DataError(f"{where}: id {it.id!r} appears twice")
        seen.add(it.id)
        items.append(it)
    return bench, items


def render_prompt(item: Item, template: str | None) -> str:
    """The benchmark's own prompt, or ``template`` filled from the record (``{question}``, ``{query_wo}`` ...)."""
    if template is None:
        return item.prompt
    fields = {k: v for k, v in item.record.items() if isinstance(v, (str, int, float))}
    fields.setdefault("question", item.question)
    try:
        return template.format_map(fields)
    except KeyError as exc:
        raise DataError(f"{item.where}: --prompt names field {exc.args[0]!r}, which the record does not have") from None
    except (ValueError, IndexError) as exc:
        raise DataError(f"--prompt is not a valid template ({exc}); write literal braces as {{{{ }}}}") from None


@dataclass
class ScoreReport:
    """Accuracy of predictions on a benchmark: overall, per category, lenient beside official, and every item."""

    benchmark: str
    data: str
    official: str
    approximation: str | None
    examples: int
    correct: int
    accuracy: float
    unanswered: int
    lenient_correct: int | None
    lenient_accuracy: float | None
    missing: int
    categories: dict[str, dict[str, dict[str, float]]]
    metrics: dict[str, Any]
    repairs: list[dict[str, str]]
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_one(bench: Benchmark, item: Item, prediction: Any, lenient: bool = False) -> dict[str, Any]:
    """The per-item record of a report: id, prediction, extracted answer, official and lenient verdicts, categories.
    A prediction that is not text (null, a number from a spreadsheet) is scored as its text, never a crash."""
    text = "" if prediction is None or prediction != prediction else str(prediction)  # None or NaN: empty
    s = bench.score(item, text, lenient)
    return {"id": item.id, "prediction": text, "extracted": s.extracted, "answer": item.answer, "correct": bool(s.correct),
            "lenient_correct": bool(s.correct or s.lenient) if lenient else None, "groups": item.groups}


def report(bench: Benchmark, items: list[Item], rows: list[dict[str, Any]], data: str, missing: int = 0) -> ScoreReport:
    """The :class:`ScoreReport` of scored ``rows`` (from :func:`score_one`, in item order)."""
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    lenient = None if any(r["lenient_correct"] is None for r in rows) else sum(r["lenient_correct"] for r in rows)
    categories: dict[str, dict[str, list[bool]]] = {}
    for r in rows:
        for key, values in r["groups"].items():
            for v in values:
                categories.setdefault(key, {}).setdefault(v, []).append(r["correct"])
    cats = {k: {v: {"examples": len(c), "correct": sum(c), "accuracy": sum(c) / len(c)} for v, c in sorted(g.items())}
            for k, g in categories.items()}
    scored_ids = {r["id"] for r in rows}
    return ScoreReport(benchmark=bench.name, data=data, official=bench.official, approximation=bench.approximation,
                       examples=n, correct=correct, accuracy=correct / n if n else 0.0,
                       unanswered=sum(not r["extracted"] for r in rows), lenient_correct=lenient,
                       lenient_accuracy=None if lenient is None else lenient / n if n else 0.0, missing=missing, categories=cats,
                       metrics=bench.metrics([i for i in items if i.id in scored_ids], rows), repairs=bench.repairs,
                       predictions=rows)


def score(data: str | os.PathLike, predictions: str | os.PathLike, format: str | None = None,
          lenient: bool = False) -> ScoreReport:
    """Score a predictions file (JSONL with the benchmark's id field or ``id``, and ``prediction``; or a VLMEvalKit
    ``.xlsx``/``.tsv`` with ``index`` and ``prediction``) against the benchmark file ``data``; ``lenient`` adds
    deltakit's lenient verdict beside the official one."""
    from deltakit.benchmarks.predictions import read_predictions  # noqa: PLC0415

    bench, items = load(data, format)
    preds = read_predictions(predictions, bench)
    by_id = {it.id: it for it in items}
    unknown = [k for k in preds if k not in by_id]
    if unknown:
        raise DataError(f"{predictions}: {len(unknown)} prediction(s) for ids not in {data} (first: {unknown[0]!r}); "
                        "wrong benchmark file?")
    rows = [score_one(bench, it, preds[it.id], lenient) for it in items if it.id in preds]
    if not rows:
        raise DataError(f"{predictions}: no predictions")
    return report(bench, items, rows, str(data), missing=len(items) - len(rows))
