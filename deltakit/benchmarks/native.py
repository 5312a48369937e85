"""deltakit's own benchmark JSONL (MathVista-style records; ``docs/eval.md``), scored by :mod:`deltakit.answers`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltakit.answers import ANSWER_TYPES, extract_answer, lenient_equal, score
from deltakit.benchmarks.core import Benchmark, Item, Scored
from deltakit.benchmarks.files import Image
from deltakit.data import DataError, iter_jsonl, resolve_image

_HINTS = {
    "multi_choice": "Answer with the option's letter from the given choices.",
    "integer": "Answer with an integer.",
    "text": "Answer with a word or a short phrase.",
}
INSTRUCTION = "Think step by step inside <think> </think>, then give the final answer in \\boxed{}."


@dataclass(frozen=True)
class BenchItem:
    """One benchmark question (a MathVista-style JSONL record)."""

    id: str
    question: str
    answer: str
    answer_type: str
    category: str
    image: Path | None = None
    choices: list[str] | None = None
    precision: int | None = None
    query: str | None = None
    where: str = ""

    @classmethod
    def from_record(cls, rec: Any, base: Path, where: str) -> "BenchItem":
        """Validate a record; ``image`` is relative to ``base``. ``answer_type`` may be left out when ``choices``
        are given (then ``multi_choice``); MathVista's ``question_type: multi_choice``, ``metadata.category``
        and float ``precision`` are understood."""
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a record must be a JSON object")
        for key in ("question", "answer"):
            if not isinstance(rec.get(key), (str, int, float)) or isinstance(rec.get(key), bool):
                raise DataError(f"{where}: missing or non-text {key!r}")
        choices = rec.get("choices")
        if choices is not None and (not isinstance(choices, list) or not choices):
            raise DataError(f"{where}: 'choices' must be a non-empty list")
        kind = "multi_choice" if rec.get("question_type") == "multi_choice" else rec.get("answer_type")
        kind = kind or ("multi_choice" if choices else None)
        if kind not in ANSWER_TYPES:
            raise DataError(f"{where}: answer_type {kind!r} is not one of {', '.join(ANSWER_TYPES)}")
        if kind == "multi_choice" and not choices:
            raise DataError(f"{where}: a multi_choice question needs 'choices'")
        letters = [chr(65 + i) for i in range(len(choices or []))]
        if kind == "multi_choice" and str(rec["answer"]) not in [str(c) for c in choices] + letters:
            raise DataError(f"{where}: answer {rec['answer']!r} is neither one of the choices nor an option letter")
        precision = rec.get("precision")
        if precision is not None and (not isinstance(precision, (int, float)) or not 0 <= precision < float("inf")):
            raise DataError(f"{where}: 'precision' must be a non-negative number of decimal places")
        if rec.get("query") is not None and not isinstance(rec["query"], str):
            raise DataError(f"{where}: 'query' must be a string (the whole prompt)")
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        category = rec.get("category") or meta.get("category") or meta.get("task") or "uncategorized"
        image = resolve_image(rec["image"], base, where) if rec.get("image") else None
        return cls(id=str(rec.get("id", rec.get("pid", where.rsplit(":", 1)[-1]))), question=str(rec["question"]),
                   answer=str(rec["answer"]), answer_type=kind, category=str(category), image=image,
                   choices=[str(c) for c in choices] if choices else None,
                   precision=int(precision) if precision is not None else None, query=rec.get("query"), where=where)


def load_bench(path: str | os.PathLike, limit: int | None = None) -> list[BenchItem]:
    """The first ``limit`` (all when None) questions of a benchmark JSONL."""
    items = []
    for rec, where in iter_jsonl(path, "benchmark file"):
        if limit is not None and len(items) >= limit:
            break
        items.append(BenchItem.from_record(rec, Path(path).parent, where))
    if not items:
        raise DataError(f"{path}: no questions")
    return items


def build_prompt(item: BenchItem) -> str:
    """The user prompt: the record's ``query`` when given, else the question, lettered choices, an answer-format
    hint (for floats the number of decimal places) and the think-then-box instruction."""
    if item.query:
        return item.query
    lines = [item.question]
    if item.choices:
        lines += ["Choices:", *(f"({chr(65 + i)}) {c}" for i, c in enumerate(item.choices))]
    if item.answer_type == "float":
        places = item.precision if item.precision is not None else 2
        lines.append(f"Answer with a number with {places} decimal place{'s' if places != 1 else ''}.")
    else:
        lines.append(_HINTS[item.answer_type])
    lines.append(INSTRUCTION)
    return "\n".join(lines)



class Native(Benchmark):
    name = "deltakit"
    title = "deltakit JSONL"
    official = "deltakit.answers (deltakit's own rules; docs/eval.md)"

    @classmethod
    def detect(cls, columns: set[str]) -> bool:
        return {"question", "answer"} <= columns

    def item(self, rec: dict[str, Any], base: Path, where: str) -> Item:
        b = BenchItem.from_record(rec, base, where)
        return Item(id=b.id, question=b.question, answer=b.answer, prompt=build_prompt(b),
                    images=[Image(path=b.image)] if b.image is not None else [],
                    groups={"category": [b.category], "answer_type": [b.answer_type]}, meta={"bench": b},
                    record={k: v for k, v in rec.items() if k != "image"}, where=where)

    def score(self, item: Item, prediction: str, lenient: bool = False) -> Scored:
        b: BenchItem = item.meta["bench"]
        extracted, correct = score(prediction, b.answer, b.answer_type, b.choices, b.precision)
        loose = None if not lenient else correct or lenient_equal(extract_answer(prediction), b.answer,
                                           b.choices if b.answer_type == "multi_choice" else None, None,
                                           b.precision if b.answer_type == "float" else None)
        return Scored(extracted=extracted, correct=correct, lenient=loose)
