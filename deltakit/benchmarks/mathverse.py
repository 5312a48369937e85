"""MathVerse (testmini, its five problem versions and the text-only config): the HF parquet, the GitHub JSON, or
VLMEvalKit's ``MathVerse_MINI.tsv``.

The official scorer (``ZrrSkywalker/MathVerse`` ``evaluation/extract_answer_s1.py`` and
``evaluation/score_answer_s2.py``) has two GPT stages: GPT extracts the answer, GPT judges it against the
gold (``--quick_match`` replaces the judge by ``answer == extraction``). Here both are replaced: deltakit's rule
extraction (:func:`deltakit.answers.extract_answer`), then ``answer == extraction`` (the quick match), a
choice letter equal to the gold letter, or math-verify equivalence. This is a GPT-free approximation and
every output says so. Tables follow score_answer_s2.py: per ``problem_version`` and per subject/subfield.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from deltakit.answers import extract_answer, lenient_equal, strip_units
from deltakit.benchmarks.core import Benchmark, Item, Scored
from deltakit.benchmarks._common import metadata, plain, text, values
from deltakit.benchmarks.files import images_of
from deltakit.benchmarks.mathcheck import equivalent

_LETTER = re.compile(r"^\s*(?:\(([A-H])\)|([A-H]))(?=$|[\s.:),])")


def choice_letter(answer: str) -> str | None:
    """The option letter an extracted answer starts with (``B``, ``(B)``, ``B: 3``, ``B. text``), or None."""
    m = _LETTER.match(answer.replace("$", "").replace("\\text{", "").replace("}", " "))
    return (m.group(1) or m.group(2)) if m else None


class MathVerse(Benchmark):
    name = "mathverse"
    title = "MathVerse"
    official = "ZrrSkywalker/MathVerse evaluation/extract_answer_s1.py + evaluation/score_answer_s2.py (quick_match)"
    approximation = ("GPT-free approximation: deltakit's rule extraction instead of the GPT extraction (stage 1), and "
                     "answer == extraction (the official quick_match), the choice letter or math-verify equivalence "
                     "instead of the GPT judge (stage 2)")
    id_fields = ("sample_index",)

    @classmethod
    def detect(cls, columns: set[str]) -> bool:
        return "problem_version" in columns or "query_cot" in columns

    def item(self, rec: dict[str, Any], base: Path, where: str) -> Item:
        meta = metadata(rec)  # a dict, or in VLMEvalKit's TSV its Python text
        question = text(rec, "question", where)
        return Item(id=self.id_of(rec, where), question=question, answer=text(rec, "answer", where),
                    prompt=text(rec, "query_cot", where, required=False) or question, images=images_of(rec, base, where),
                    groups={"problem_version": values(rec.get("problem_version")),
                            "subject": values(rec.get("subject", meta.get("subject"))),
                            "subfield": values(rec.get("subfield", meta.get("subfield")))},
                    meta={"question_type": text(rec, "question_type", where, required=False) or ""},
                    record=plain(rec), where=where)

    def score(self, item: Item, prediction: str, lenient: bool = False) -> Scored:
        extraction = extract_answer(prediction)
        gold = item.answer.strip()
        if extraction == gold:  # score_answer_s2.py's quick_match
            correct = True
        elif item.meta["question_type"] == "multi-choice" or re.fullmatch(r"[A-H]", gold):
            correct = choice_letter(extraction) == gold
        else:
            correct = bool(extraction) and equivalent(gold, extraction)
        loose = None if not lenient else correct or (not re.fullmatch(r"[A-H]", gold) and lenient_equal(strip_units(extraction), gold))
        return Scored(extracted=extraction, correct=correct, lenient=loose)
