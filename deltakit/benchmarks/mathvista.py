"""MathVista (testmini/test): the HF parquet (``decoded_image``), the GitHub ``testmini.json`` + ``images/``, or
VLMEvalKit's ``MathVista_MINI.tsv``.

Scoring ports ``lupantech/MathVista`` ``evaluation/calculate_score.py`` (``normalize_extracted_answer``,
``get_most_similar``, ``safe_equal``) exactly, and the rule steps of ``evaluation/extract_answer.py``
(``extract_answer`` before its GPT call: an empty response, a response that is one of the choices, an
``int``/``float`` response, the quick-extract pattern ``The answer is "..."``). The GPT extraction that
follows them is replaced by deltakit's rule extraction (:func:`deltakit.answers.extract_answer`: the text
after ``</think>``, the last ``\\boxed{}``, else a final-answer phrase).

The prompt is the record's ``query`` (the HF parquet); for the GitHub ``testmini.json``, which keeps its
queries apart in ``data/query.json``, the same query is built by :func:`build_query` (``evaluation/build_query.py``,
zero-shot); for VLMEvalKit's TSV, which has no ``query``, its ``question`` as it is (VLMEvalKit sends it
unchanged, ``vlmeval/dataset/image_base.py`` ``build_prompt``, and its ``utils/mathvista.py`` puts it where
MathVista's ``extract_answer.py`` puts ``query``). VLMEvalKit's TSV has no ``precision`` column either: a float
answer's precision is then its number of decimals, as it is for every float answer of testmini.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from Levenshtein import distance

from deltakit.answers import extract_answer, lenient_equal
from deltakit.benchmarks.core import Benchmark, Item, Scored
from deltakit.benchmarks._common import metadata, plain, str_list, text, values, vlmevalkit
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


HINTS = {
    "multi_choice": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.",
    ("float", 1): "Hint: Please answer the question requiring a floating-point number with one decimal place and provide the "
                  "final value, e.g., 1.2, 1.3, 1.4, at the end.",
    ("float", 2): "Hint: Please answer the question requiring a floating-point number with two decimal places and provide the "
                  "final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., "
            "[1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}
"""build_query.py's hint texts (``shot_type="solution"``), by question or answer type."""


def build_query(question: str, choices: list[str] | None, unit: str | None, question_type: str, answer_type: str,
                precision: float | None) -> str:
    """MathVista's published ``query`` (``data/query.json``, the parquet's ``query``): build_query.py's
    ``create_one_query`` zero-shot, without caption or OCR: hint, ``Question: ...`` (`` (Unit: u)``), ``Choices:``."""
    if question_type == "multi_choice":
        hint = HINTS["multi_choice"]
    elif answer_type == "float":  # the official code has hints for precision 1 and 2 only, all testmini has
        n = int(precision or 0)
        hint = HINTS.get(("float", n)) or (f"Hint: Please answer the question requiring a floating-point number with {n} "
                                           "decimal places and provide the final value at the end.")
    else:
        hint = HINTS.get(answer_type, "")
    question_text = f"Question: {question}" + (f" (Unit: {unit})" if unit else "")
    choices_text = "\n".join(["Choices:", *(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices))]) if choices else ""
    return "\n".join(e for e in (hint, question_text, choices_text) if e).strip()


def decimals(answer: str) -> int:
    """The number of decimals of a float answer as written (``"1.25"`` -> 2): its precision where none is given."""
    return len(answer.split(".", 1)[1]) if "." in answer else 0


class MathVista(Benchmark):
    name = "mathvista"
    title = "MathVista"
    official = "lupantech/MathVista evaluation/calculate_score.py + the rule steps of evaluation/extract_answer.py"
    approximation = ("GPT-free: the rule steps of MathVista's extract_answer.py, then deltakit's rule extraction instead "
                     "of its GPT-4 extraction; calculate_score.py exactly")
    id_fields = ("pid",)

    @classmethod
    def detect(cls, columns: set[str]) -> bool:
        return {"question_type", "answer_type"} <= columns and "problem_version" not in columns  # TSV: no precision

    def item(self, rec: dict[str, Any], base: Path, where: str) -> Item:
        meta = metadata(rec)
        choices = str_list(rec.get("choices"), where, "choices")
        qt, at = text(rec, "question_type", where), text(rec, "answer_type", where)
        p = text(rec, "precision", where, required=False)  # JSON float, parquet float/None, TSV text ("1.0")
        try:
            precision = float(p) if p is not None else None
        except ValueError:
            raise DataError(f"{where}: 'precision' must be a number, got {p!r}") from None
        unit = text(rec, "unit", where, required=False)
        question = text(rec, "question", where)
        answer = text(rec, "answer", where)
        if precision is None and at == "float":
            precision = float(decimals(answer))
        groups = {k: values(rec.get(k, meta.get(k))) for k in GROUPS}
        query = text(rec, "query", where, required=False)
        if query is None:
            query = question if vlmevalkit(rec) else build_query(question, choices, unit, qt, at, precision)
        return Item(id=self.id_of(rec, where), question=question, answer=answer, prompt=query,
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
