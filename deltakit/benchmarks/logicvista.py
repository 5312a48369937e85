"""LogicVista: the GitHub ``data/dataset.json`` (records keyed ``v1_N``; ``imagename`` under ``images/``) or
VLMEvalKit's ``LogicVista.tsv``. Answers may be several letters (``B, D``).

Scoring ports ``Yijia-Xiao/LogicVista`` ``eval/extract_accuracy.py`` (``eval/README.md`` calls it
``extract_accuracy_new.py``; the repository holds only ``extract_accuracy.py``): the text after ``ASSISTANT:``;
a one-character answer that is a letter other than a-e, or neither a letter nor a digit, is "no answer"
(``ZZZZZ``); the gold ``answer.split(", ")`` and the chosen letters, lower-cased and sorted, must be equal (a
set match). The GPT-4 extraction of the chosen letters is replaced by deltakit's rule extraction (the last
``\\boxed{}`` or final-answer phrase, read as a list of letters or numbers; else, as VLMEvalKit's
``can_infer_option``, the one option letter standing alone among the last words). Tables follow
``eval/analyze_accuracy.py``: per reasoning skill, and per capability (its nine names, each counted where it
occurs in the record's capabilities). The published ``dataset.json`` has ``broad_capability`` and
``specific_capability`` where the evaluation code reads ``capability``; ``broad_capability`` stands for it.

The prompt is the question as it is: the repository has no inference prompt, and VLMEvalKit's ``LogicVista``
sends the question unchanged (``vlmeval/dataset/image_base.py`` ``build_prompt``), as lmms-eval's task does
(``lmms_eval/tasks/logicvista/reasoning/utils.py``).
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
CAPABILITIES = ("diagram", "ocr", "patterns", "graphs", "tables", "3d shapes", "puzzles", "sequences", "physics")
"""analyze_accuracy.py's ``cat``: a record counts for each name found in its capabilities (``str.contains``)."""
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


_LETTERS = "ABCDEFGH"  # the option letters of dataset.json (A-E, and F, G for its larger grids)


def can_infer_option(answer: str) -> str | None:
    """VLMEvalKit ``vlmeval/utils/matching_util.py`` ``can_infer_option``: the punctuation ``.()[],:;!*#{}`` made
    spaces, the one option letter that stands alone as a word, when among the last four words; else None."""
    for c in ".()[],:;!*#{}":
        answer = answer.replace(c, " ")
    words = answer.split()
    found = [c for c in _LETTERS if c in words]
    if len(found) == 1 and words.index(found[0]) > len(words) - 5:
        return found[0]
    return None


def official_choices(response: str) -> list[str]:
    """extract_accuracy.py's answer list, with the rule extraction where it asks GPT."""
    entry = response.split("ASSISTANT:")[1] if "ASSISTANT:" in response else response
    s = entry.strip()
    if len(s) == 0:
        return [s]
    if (len(s) == 1 and s.isalpha() and s.lower() not in "abcde") or (len(s) == 1 and not s.isalpha() and not s.isnumeric()):
        return [NONE]
    picked = chosen(extract_answer(entry))
    if picked == [NONE]:
        letter = can_infer_option(entry)
        picked = [letter] if letter else picked
    return picked


def matches(choices: list[str], gold: str) -> bool:
    """The official set match: ``gold.split(", ")`` and the choices, lower-cased and sorted, equal."""
    return sorted(c.lower() for c in choices) == sorted(t.lower() for t in gold.split(", "))


class LogicVista(Benchmark):
    name = "logicvista"
    title = "LogicVista"
    official = "Yijia-Xiao/LogicVista eval/extract_accuracy.py + eval/analyze_accuracy.py"
    approximation = ("GPT-free: deltakit's rule extraction of the chosen letters (else VLMEvalKit's can_infer_option) instead "
                     "of the GPT-4 extraction; the official set match")

    @classmethod
    def detect(cls, columns: set[str]) -> bool:
        return bool({"imagename", "skill", "broad_capability"} & columns)  # dataset.json; VLMEvalKit's TSV has skill

    def item(self, rec: dict[str, Any], base: Path, where: str) -> Item:
        question = text(rec, "question", where)
        caps = str(values(rec.get("capability", rec.get("broad_capability"))))
        return Item(id=self.id_of(rec, where), question=question, answer=text(rec, "answer", where), prompt=question,
                    images=images_of(rec, base, where),
                    groups={"skill": values(rec.get("skill")),
                            "capability": [c for c in CAPABILITIES if c.replace(" ", "") in caps]},
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
