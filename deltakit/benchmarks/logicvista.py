"""LogicVista: the GitHub ``data/dataset.json`` (records keyed ``v1_N``; ``imagename`` under ``images/``) or
VLMEvalKit's ``LogicVista.tsv``. Answers may be several letters (``B, D``).

Scoring ports ``Yijia-Xiao/LogicVista`` ``eval/extract_accuracy_new.py``: the text after ``ASSISTANT:``; a
one-character answer that is a letter other than a-e, or neither a letter nor a digit, is "no answer"
(``ZZZZZ``); the gold ``answer.split(", ")`` and the chosen letters, lower-cased and sorted, must be equal (a
set match). The GPT-4 extraction of the chosen letters is replaced by deltakit's rule extraction (the last
``\\boxed{}`` or final-answer phrase, read as a list of letters or numbers). Tables follow
``eval/analyze_accuracy.py``: per reasoning skill and per capability.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from deltakit.answers import extract_answer
from deltakit.benchmarks.core import Benchmark, Item, Scored
from deltakit.benchmarks._common import plain, text, values
from deltakit.benchmarks.files import images_of

NONE = "ZZZZZ"
_TOKEN = r"\(?(?:[A-Za-z]|\d+)\)?"
_LIST = re.compile(rf"{_TOKEN}(?:\s*(?:,|\band\b|&|/|\s)\s*{_TOKEN})*")
_LEAD = re.compile(r"^\(?([A-Z])\)?(?=$|[\s.:),])")


def chosen(answer: str) -> list[str]:
    """The letters (or numbers) an extracted answer chooses: ``B``, ``(B)``, ``A, C``, ``B and D``, ``C. text``; else [ZZZZZ]."""
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", answer).replace("$", "").replace("*", "").strip().rstrip(".").strip()
    if s and _LIST.fullmatch(s):
        return re.findall(r"[A-Za-z]|\d+", re.sub(r"\band\b", ",", s))
    m = _LEAD.match(s)
    return [m.group(1)] if m else [NONE]


def official_choices(response: str) -> list[str]:
    """extract_accuracy_new.py's answer list, with the rule extraction where it asks GPT."""
    entry = response.split("ASSISTANT:")[1] if "ASSISTANT:" in response else response
    s = entry.strip()
    if len(s) == 0:
        return [s]
    if (len(s) == 1 and s.isalpha() and s.lower() not in "abcde") or (len(s) == 1 and not s.isalpha() and not s.isnumeric()):
        return [NONE]
    return chosen(extract_answer(entry))


def matches(choices: list[str], gold: str) -> bool:
    """The official set match: ``gold.split(", ")`` and the choices, lower-cased and sorted, equal."""
    return sorted(c.lower() for c in choices) == sorted(t.lower() for t in gold.split(", "))


class LogicVista(Benchmark):
    name = "logicvista"
    title = "LogicVista"
    official = "Yijia-Xiao/LogicVista eval/extract_accuracy_new.py + eval/analyze_accuracy.py"
    approximation = "GPT-free: deltakit's rule extraction of the chosen letters instead of the GPT-4 extraction; the official set match"

    @classmethod
    def detect(cls, columns: set[str]) -> bool:
        return {"skill", "capability"} <= columns or "imagename" in columns

    def item(self, rec: dict[str, Any], base: Path, where: str) -> Item:
        question = text(rec, "question", where)
        prompt = (f"{question}\nAnswer with the letter(s) of the correct choice(s), e.g. \\boxed{{B}} or \\boxed{{A, C}}.")
        return Item(id=self.id_of(rec, where), question=question, answer=text(rec, "answer", where), prompt=prompt,
                    images=images_of(rec, base, where),
                    groups={"skill": values(rec.get("skill")), "capability": values(rec.get("capability"))},
                    record=plain(rec), where=where)

    def score(self, item: Item, prediction: str, lenient: bool = False) -> Scored:
        picked = official_choices(prediction)
        correct = matches(picked, item.answer)
        loose = None
        if lenient:  # deltakit's: the letters of the rule extraction as a set, gold split on commas or spaces
            gold = {t.strip().lower() for t in re.split(r"[,\s]+", item.answer) if t.strip()}
            loose = correct or {c.lower() for c in chosen(extract_answer(prediction))} == gold
        extracted = ", ".join(picked) if picked != [NONE] and picked != [""] else None
        return Scored(extracted=extracted, correct=correct, lenient=loose)
