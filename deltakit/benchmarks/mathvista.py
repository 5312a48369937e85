"""MathVista (testmini/test): the HF parquet (``decoded_image``), the GitHub ``testmini.json`` + ``images/``, or
VLMEvalKit's ``MathVista_MINI.tsv``.

Scoring ports ``lupantech/MathVista`` ``evaluation/calculate_score.py`` (``normalize_extracted_answer``,
``get_most_similar``, ``safe_equal``) exactly, and the rule steps of ``evaluation/extract_answer.py``
(``extract_answer`` before its GPT call: an empty response, a response that is one of the choices, an
``int``/``float`` response, the quick-extract pattern ``The answer is "..."``). The GPT extraction that
follows them is replaced by deltakit's rule extraction (:func:`deltakit.answers.extract_answer`: the text
after ``</think>``, the last ``\\boxed{}``, else a final-answer phrase).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from Levenshtein import distance

from deltakit.answers import extract_answer, lenient_equal
from deltakit.benchmarks.core import Benchmark, Item, Scored
from deltakit.benchmarks._common import plain, str_list, text, values
from deltakit.benchmarks.files import images_of
from deltakit.data import DataError

GROUPS = ("question_type", "answer_type", "language", "source", "category", "task", "context", "grade", "skills")
"""calculate_score.py's ``target_keys``: the per-category tables."""


def get_most_similar(prediction: str, choices: list[str]) -> str:
    """The choice nearest ``prediction`` by Levenshtein distance (the first of equals), as the official code."""
    distances = [distance(prediction, choice) for choice in choices]
    return choices[distances.index(min(distances))]


def normalize_extracted_answer(extraction: Any, choices: list[str] | None, question_type: str, answer_type: str,
                               precision: Any, ignore_empty_extractions: bool = False) -> str | None:
    """calculate_score.py's ``normalize_extracted_answer``: a letter (or ``(x)``) maps to its choice, anything else to
    the nearest choice; integers truncated (``int(float(x))``); floats ``round(float(x), int(precision))``."""
    if question_type == "multi_choice":
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction)
        if ignore_empty_extractions and not extraction:
            return None
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if len(letter) > 0:
            extraction = letter[0].upper()
        sequential_characters = [chr(ord("A") + i) for i in range(len(choices or []))]
        if extraction in sequential_characters:
            return choices[sequential_characters.index(extraction)]
        return get_most_similar(extraction, choices or [""])
    if answer_type == "integer":
        try:
            return str(int(float(extraction)))
        except Exception:  # noqa: BLE001 - the official bare except: anything unparseable is no answer
            return None
    if answer_type == "float":
        try:
            return str(round(float(extraction), int(precision)))
        except Exception:  # noqa: BLE001
            return None
    if answer_type == "list":
        try:
            return str(extraction)
        except Exception:  # noqa: BLE001
            return None
    return extraction


def safe_equal(prediction: Any, answer: Any) -> bool:
    """calculate_score.py's ``safe_equal``: ``prediction == answer``, False if comparing raises."""
    try:
        return bool(prediction == answer)
    except Exception:  # noqa: BLE001
        return False


def extract(response: str, question_type: str, answer_type: str, choices: list[str] | None) -> str:
    """extract_answer.py's rule steps (in its order), then deltakit's rule extraction where it would ask GPT."""
    if response == "":
        return ""
    if question_type == "multi_choice" and response in (choices or []):
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except (ValueError, OverflowError):
            pass
    result = re.search(r'The answer is "(.*)"\.', response)  # the --quick_extract rule
    if result:
        return result.group(1)
    return extract_answer(response)


def default_prompt(question: str, choices: list[str] | None, answer_type: str, precision: Any, unit: str | None) -> str:
    """A prompt for a record without MathVista's own ``query``: question, lettered choices and a format hint."""
    lines = [question]
    if choices:
        lines += ["Choices:", *(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))]
        lines.append("Answer with the option's letter from the given choices.")
    elif answer_type == "integer":
        lines.append("Answer with an integer.")
    elif answer_type == "float":
        lines.append(f"Answer with a number with {int(float(precision or 1))} decimal place(s).")
    elif answer_type == "list":
        lines.append("Answer with a Python list.")
    else:
        lines.append("Answer with a word or a short phrase.")
    if unit:
        lines.append(f"(unit: {unit})")
    lines.append("Give the final answer in \\boxed{}.")
    return "\n".join(lines)


class MathVista(Benchmark):
    name = "mathvista"
    title = "MathVista"
    official = "lupantech/MathVista evaluation/calculate_score.py + the rule steps of evaluation/extract_answer.py"
    approximation = ("GPT-free: the rule steps of MathVista's extract_answer.py, then deltakit's rule extraction instead "
                     "of its GPT-4 extraction; calculate_score.py exactly")
    id_fields = ("pid",)

    @classmethod
    def detect(cls, columns: set[str]) -> bool:
        return {"question_type", "answer_type", "precision"} <= columns and "problem_version" not in columns

    def item(self, rec: dict[str, Any], base: Path, where: str) -> Item:
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        choices = str_list(rec.get("choices"), where, "choices")
        qt, at = text(rec, "question_type", where), text(rec, "answer_type", where)
        p = text(rec, "precision", where, required=False)  # JSON float, parquet float/None, TSV text ("1.0")
        try:
            precision = float(p) if p is not None else None
        except ValueError:
            raise DataError(f"{where}: 'precision' must be a number, got {p!r}") from None
        unit = text(rec, "unit", where, required=False)
        question = text(rec, "question", where)
        groups = {k: values(rec.get(k, meta.get(k))) for k in GROUPS}
        query = text(rec, "query", where, required=False)
        return Item(id=self.id_of(rec, where), question=question, answer=text(rec, "answer", where),
                    prompt=query or default_prompt(question, choices, at, precision, unit),
                    images=images_of(rec, base, where), groups={k: v for k, v in groups.items() if v},
                    meta={"choices": choices, "question_type": qt, "answer_type": at, "precision": precision, "unit": unit},
                    record=plain(rec), where=where)

    def score(self, item: Item, prediction: str, lenient: bool = False) -> Scored:
        m = item.meta
        extraction = extract(prediction, m["question_type"], m["answer_type"], m["choices"])
        normalized = normalize_extracted_answer(extraction, m["choices"], m["question_type"], m["answer_type"], m["precision"])
        correct = safe_equal(normalized, item.answer)
        mc = m["question_type"] == "multi_choice"
        loose = None if not lenient else correct or lenient_equal(extraction, item.answer, m["choices"] if mc else None, m["unit"],
                                           int(float(m["precision"])) if m["answer_type"] == "float" and m["precision"] is not None else None)
        return Scored(extracted=extraction, correct=correct, lenient=loose)
