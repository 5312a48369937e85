"""We-Math (testmini): the HF parquet or JSON (``ID``, ``key``, ``knowledge concept``, ``option``, ``answer``,
``image_path``), or VLMEvalKit's ``WeMath.tsv``.

Scoring ports ``We-Math/We-Math`` ``evaluation/four_dimensional_metrics.py`` and ``evaluation/accuracy.py``
exactly: the per-step rule (``load_and_process_data``: the text after the last ``Answer``, ``>``/``<``/``:``/``.``
removed, its first character if it is one of ``A``-``H``, equal to the gold letter), the merge of each
multi-step problem's steps on ``ID`` (``process_steps_data``), and the four dimensions
(``calculate_metrics``/``compute_final_scores``: insufficient knowledge IK, inadequate generalisation IG,
complete mastery CM, rote memorisation RM, strict and loose) with the score
``(N - 0.5 IG - RM - IK) / N`` over the N two- and three-step problems (the official code writes N = 525,
the testmini count; here N is counted, which is 525 on the full testmini), plus accuracy.py's one-, two-
and three-step accuracies. No GPT is involved.

The prompt is We-Math's answer template, the one its ``<Answer>`` rule is written for (:data:`PROMPT`). The
We-Math repository does not print it (its README: "our prompt specifies the format of answer generation");
its wording is fixed by VLMEvalKit's ``WeMath.tsv``, whose questions end in that format sentence (VLMEvalKit's
``vlmeval/vlm/internvl/utils.py`` ``build_mpo_prompt`` removes exactly ``Regarding the format, ... <Answer>:
<<your option>>`` from them). For that TSV the prompt is VLMEvalKit's ``WeMath.build_prompt``
(``vlmeval/dataset/image_mcq.py``): ``Hint:`` when given, ``Question: {question}``, and ``Options:`` from its
``A``-``H`` columns as ``A. text`` lines. Its rows are scored by the same rule (VLMEvalKit's
``utils/wemath.py`` ``load_and_process_data``, its default ``exact_matching``).
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

from deltakit.answers import extract_answer
from deltakit.benchmarks.core import Benchmark, Item, Scored
from deltakit.benchmarks._common import plain, text, values, vlmevalkit
from deltakit.benchmarks.files import images_of
from deltakit.data import DataError

PROMPT = ("Now, we require you to solve a multiple-choice math question. Please briefly describe your thought process "
          "and provide the final answer(option).\nQuestion: {question}\nOption: {option}\nRegarding the format, please "
          "answer following the template below, and be sure to include two <> symbols:\n<Thought process>: <<your "
          "thought process>> <Answer>: <<your option>>")


def vlmevalkit_prompt(rec: dict[str, Any], question: str) -> str:
    """VLMEvalKit's ``WeMath.build_prompt`` (the ``WeMath`` dataset; ``WeMath_COT`` adds its ``requirement``)."""
    options = {c: rec[c] for c in string.ascii_uppercase if rec.get(c) is not None}
    prompt = f"Hint: {rec['hint']}\n" if rec.get("hint") is not None else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
    return prompt


def processed_answer(response: str) -> str | None:
    """four_dimensional_metrics.py's ``processed_answer``: the option letter after the last ``Answer``, or None."""
    x = re.sub(r"[>><<:.]", "", response.split("Answer")[-1].strip()).strip()
    return x[0] if x and x[0] in "ABCDEFGH" else None


def four_dimensional(rows: list[tuple[str, str, bool | None]]) -> dict[str, Any]:
    """The four dimensions of ``(ID, key, joker)`` rows (a missing step is None, as pandas' NaN: neither True nor False)."""
    counts = dict.fromkeys(("InadequateGeneralization", "InsufficientKnowledge", "CompleteMastery_loose",
                            "CompleteMastery_strict", "RoteMemorization_loose", "RoteMemorization_strict"), 0)
    step_acc: dict[int, list[bool]] = {2: [], 3: []}
    one_step: list[bool] = []
    problems = 0
    for steps in (2, 3):
        by_key: dict[str, dict[str, bool | None]] = {}
        order: list[str] = []
        for pid, key, joker in rows:
            if key.startswith(f"{steps}steps"):
                by_key.setdefault(key, {})[pid] = joker
                if key == f"{steps}steps_1":
                    order.append(pid)
        for pid in order:  # merged on ID_1, left joins (process_steps_data)
            problems += 1
            j = [by_key.get(f"{steps}steps_{i}", {}).get(pid) for i in range(1, steps + 1)]
            m = by_key.get(f"{steps}steps_multi", {}).get(pid)
            t, f = [x is True for x in j], [x is False for x in j]
            counts["RoteMemorization_loose"] += all(f) and m is True
            counts["RoteMemorization_strict"] += any(f) and m is True
            counts["InadequateGeneralization"] += all(t) and m is False
            counts["InsufficientKnowledge"] += any(f) and m is False
            counts["CompleteMastery_loose"] += any(t) and m is True
            counts["CompleteMastery_strict"] += all(t) and m is True
            one_step += [x for x in j if x is not None]  # pandas mean skips NaN
            if m is not None:
                step_acc[steps].append(m)
    n = problems

    def rate(a: int, b: int) -> float | None:
        return a / b if b else None

    out: dict[str, Any] = {"problems": n, "counts": counts}
    if n:
        for mode in ("strict", "loose"):
            out[f"score_{mode}"] = (n - 0.5 * counts["InadequateGeneralization"] - counts[f"RoteMemorization_{mode}"]
                                    - counts["InsufficientKnowledge"]) / n
        out["rates"] = {"InsufficientKnowledge": rate(counts["InsufficientKnowledge"], n),
                        "InadequateGeneralization": rate(counts["InadequateGeneralization"], n),
                        **{f"CompleteMastery_{m}": rate(counts[f"CompleteMastery_{m}"], n) for m in ("strict", "loose")},
                        **{f"RoteMemorization_{m}": rate(counts[f"RoteMemorization_{m}"],
                                                         counts[f"CompleteMastery_{m}"] + counts[f"RoteMemorization_{m}"])
                           for m in ("strict", "loose")}}
    out["step_accuracy"] = {"one_step": rate(sum(one_step), len(one_step)), "two_step": rate(sum(step_acc[2]), len(step_acc[2])),
                            "three_step": rate(sum(step_acc[3]), len(step_acc[3]))}
    return out


class WeMath(Benchmark):
    name = "wemath"
    title = "We-Math"
    official = "We-Math/We-Math evaluation/four_dimensional_metrics.py + evaluation/accuracy.py"
    id_fields = ("question number",)

    @classmethod
    def detect(cls, columns: set[str]) -> bool:
        return "knowledge concept" in columns or {"ID", "key", "option"} <= columns

    def id_of(self, rec: dict[str, Any], where: str) -> str:
        for key in ("question number", "index"):
            if rec.get(key) not in (None, ""):
                return str(rec[key])
        if rec.get("ID") not in (None, "") and rec.get("key"):
            return f"{rec['ID']}:{rec['key']}"
        raise DataError(f"{where}: no id field (question number, index, or ID and key)")

    def item(self, rec: dict[str, Any], base: Path, where: str) -> Item:
        question = text(rec, "question", where)
        option = text(rec, "option", where, required=False) or ""
        return Item(id=self.id_of(rec, where), question=question, answer=text(rec, "answer", where).strip(),
                    prompt=vlmevalkit_prompt(rec, question) if vlmevalkit(rec) else PROMPT.format(question=question, option=option),
                    images=images_of(rec, base, where),
                    groups={"key": [str(rec.get("key", "")).split("_")[0]] if rec.get("key") else [],
                            "knowledge concept": values(rec.get("knowledge concept"))},
                    meta={"ID": text(rec, "ID", where, required=False) or "", "key": text(rec, "key", where, required=False) or ""},
                    record=plain(rec), where=where)

    def score(self, item: Item, prediction: str, lenient: bool = False) -> Scored:
        letter = processed_answer(prediction)
        correct = letter == item.answer
        boxed = extract_answer(prediction).strip().strip("()").strip()
        loose = None if not lenient else correct or (boxed[:1] == item.answer and (len(boxed) == 1 or not boxed[1].isalnum()))
        return Scored(extracted=letter, correct=correct, lenient=loose)

    def metrics(self, items: list[Item], rows: list[dict[str, Any]]) -> dict[str, Any]:
        by_id = {it.id: it for it in items}
        steps = [(by_id[r["id"]].meta["ID"], by_id[r["id"]].meta["key"], r["correct"]) for r in rows]
        return {"four_dimensional": four_dimensional(steps)}
