"""MATH-Vision (test/testmini): the HF parquet (``decoded_image``), the GitHub JSONL (``image`` paths), or VLMEvalKit's
``MathVision.tsv``.

Scoring ports ``mathllm/MATH-V`` ``evaluation/evaluate.py`` (the ``model_answer`` extraction chain and
``is_equal(gt, answer) or is_equal(gt_option_text, answer)``) and ``evaluation/utils.py`` (``find_math_answer``,
``_strip_string`` and its helpers, ``eval_tuple``, ``is_equal``) exactly, but for one step: where the
official code evaluates ``eval(str(latex2sympy(s)))`` (Python ``eval`` on parsed LaTeX, ``from math import *``),
the value comes from latex2sympy2_extended (math-verify's LaTeX parser) and sympy's numeric evaluation, in
a time-bounded helper process (:mod:`deltakit.benchmarks.mathcheck`). A gold answer or option holding the
form feed ``\\x0c`` where ``\\f`` (of ``\\frac``) was meant, a known data fault, is repaired and listed in
the report's ``repairs``.

The prompt is the benchmark's own chain-of-thought prompt, ``geninput`` of ``models/GPT4.py`` and
``models/Qwen-VL.py`` (the repository's inference scripts; ``evaluation/`` has none): the instruction to box the
answer (one letter for a multiple-choice question), the question, and the five options as ``(A) ...`` lines,
left out when the options are the bare letters ``A``-``E`` (the choices are drawn in the image). For
VLMEvalKit's ``MathVision.tsv`` the prompt is its ``question`` as it is (VLMEvalKit's ``MathVision`` sends it
unchanged: ``vlmeval/dataset/image_base.py`` ``build_prompt``); that file names the subject ``category`` and
holds the options as ``choices`` (``vlmeval/dataset/utils/mathv.py``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from deltakit.answers import extract_answer, lenient_equal
from deltakit.benchmarks.core import Benchmark, Item, Scored
from deltakit.benchmarks._common import plain, str_list, text, values, vlmevalkit
from deltakit.benchmarks.files import images_of
from deltakit.benchmarks.mathcheck import numeric_value


def is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _value(s: str) -> float:
    """``eval(str(latex2sympy(s)))`` of the official code, as a bounded numeric evaluation; raises when there is none."""
    v = numeric_value(s)
    if v is None:
        raise ValueError(s)
    return v


def eval_tuple(s: str) -> str:
    """utils.py ``eval_tuple``: each element of ``(a,b)`` / ``[a,b]`` evaluated and rounded to 2 places."""
    sl = s[1:-1].split(",")
    try:
        if s[0] == "(" and s[-1] == ")" and len(sl) > 1:
            s = ",".join([str(round(_value(sub), 2)) if "infty" not in sub and sub not in ["a", "-a"] else sub for sub in sl])
            return f"({s})"
        elif s[0] == "[" and s[-1] == "]" and len(sl) > 1:
            s = ",".join([str(round(_value(sub), 2)) if "infty" not in sub and sub not in ["a", "-a"] else sub for sub in sl])
            return f"[{s}]"
    except Exception:  # noqa: BLE001 - as the official: any failure keeps the string
        return s
    return s


def is_equal(asw: str, gt_asw: str) -> bool:
    """utils.py ``is_equal``: equal after lower-casing, after ``eval_tuple``, or numerically to 2 decimal places."""
    asw = asw.lower()
    gt_asw = gt_asw.lower()
    if asw.replace(" ", "") == "" or gt_asw.replace(" ", "") == "":
        return False
    if gt_asw.strip() == asw.strip():
        return True
    asw = eval_tuple(asw)
    gt_asw = eval_tuple(gt_asw)
    if gt_asw == asw:
        return True
    try:
        return round(_value(gt_asw), 2) == round(_value(asw), 2)
    except Exception:  # noqa: BLE001
        return False


def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    if len(substrs) > 1:
        substrs = substrs[1:]
        for substr in substrs:
            new_str += "\\frac"
            if len(substr) > 0 and substr[0] == "{":
                new_str += substr
            else:
                if len(substr) < 2:
                    return string
                a = substr[0]
                b = substr[1]
                if b != "{":
                    if len(substr) > 2:
                        new_str += "{" + a + "}{" + b + "}" + substr[2:]
                    else:
                        new_str += "{" + a + "}{" + b + "}"
                else:
                    if len(substr) > 2:
                        new_str += "{" + a + "}" + b + substr[2:]
                    else:
                        new_str += "{" + a + "}" + b
    return new_str


def _fix_a_slash_b(string: str) -> str:
    if len(string.split("/")) != 2:
        return string
    a, b = string.split("/")
    try:
        a, b = int(a), int(b)
        assert string == "{}/{}".format(a, b)
        return "\\frac{" + str(a) + "}{" + str(b) + "}"
    except (ValueError, AssertionError):
        return string


def _remove_right_units(string: str) -> str:
    return string.split("\\text{ ")[0]


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if len(split) > 0 and split[0] != "{":
            new_substr = "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_substr = "\\sqrt" + split
        new_string += new_substr
    return new_string


def _strip_string(string: str) -> str:
    string = string.replace("\n", "")
    string = string.replace("\\!", "")
    string = string.replace("\\\\", "\\")
    string = string.replace("tfrac", "frac")
    string = string.replace("dfrac", "frac")
    string = string.replace("\\left", "")
    string = string.replace("\\right", "")
    string = string.replace("^{\\circ}", "")
    string = string.replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = string.replace("$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.")
    string = string.replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2:
        string = string.split("=")[-1]
    if len(string.split("\\approx")) == 2:
        string = string.split("\\approx")[-1]
    if "sqrt" in string:
        string = _fix_sqrt(string)
    string = string.replace(" ", "")
    if "sqrt" in string:  # sic: the official code fixes fractions only when a sqrt is present
        string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    string = _fix_a_slash_b(string)
    return string


def find_math_answer(s: str) -> str:
    """utils.py ``find_math_answer``: the (greedy) ``\\boxed{...}`` content or the whole text, cleaned and stripped."""
    s = s.lower()
    if "{}" in s:
        s = s.replace("{}", "")
    found = re.compile("oxed{(.*)}", flags=re.S).findall(s)
    ans = found[-1] if found else s
    if ans.find("}") != -1 and (ans.find("{") == -1 or ans.find("}") < ans.find("{")):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1]
    ans = ans.split("\\approx")[-1]
    ans = ans.replace(" ", "").replace("\\,", "").replace("∞", "\\infty")
    ans = ans.replace("+\\infty", "\\infty").replace("\\\\", "\\").replace("\n", "")
    ans = ans.replace("\\text", "").replace("\\mbox", "").replace("bmatrix", "pmatrix")
    ans = ans.replace("\\left", "").replace("\\right", "").replace("^{\\circ}", "")
    ans = ans.replace("^\\circ", "").replace("{m}^3", "").replace("m^3", "")
    ans = ans.replace("{units}", "").replace("units", "").replace("{km}", "").replace("km", "")
    return _strip_string(ans)


PROMPT = ('Please solve the problem step by step and put your answer in one "\\boxed{}". If it is a multiple choice '
          'question, only one letter is allowed in the "\\boxed{}".\n')
"""models/GPT4.py and models/Qwen-VL.py ``geninput``: the instruction before ``f"{question}\\n{options}"``."""


def build_prompt(question: str, options: list[str]) -> str:
    """``geninput`` of models/GPT4.py and models/Qwen-VL.py: :data:`PROMPT`, the question, and the options as
    ``(A) ...\\n`` lines unless they are the bare letters ``ABCDE`` (the official code asserts five options)."""
    opts = ""
    if options and "".join(options) != "ABCDE":
        opts = "".join(f"({chr(ord('A') + i)}) {o}\n" for i, o in enumerate(options))
    return PROMPT + f"{question}\n{opts}"


def model_answer(response: str) -> str:
    """evaluate.py's extraction of ``model_answer`` from a response, step by step as the official loop."""
    model_answer = response.strip()
    for c in "ABCDE":
        if (model_answer.endswith(f" {c}.") or model_answer.endswith(f" ({c}).") or model_answer.startswith(f"{c}\n")
                or model_answer.startswith(f"({c})\n") or model_answer.startswith(f"({c}) {c}\n")):
            model_answer = c
    if is_number(model_answer.split("is ")[-1].rstrip(".")):
        model_answer = model_answer.split("is ")[-1].rstrip(".")
    if "oxed{" not in model_answer:
        for flag in ["the final answer is", "the answer is", "the correct answer is", "the answer should be"]:
            raw_model_answer = model_answer
            model_answer = model_answer.split(flag)[-1].strip()
            if flag in raw_model_answer:
                model_answer = model_answer.split("\n")[0].split(". ")[0]
            flag = flag.replace("the", "The")
            raw_model_answer = model_answer
            model_answer = model_answer.split(flag)[-1].strip()
            if flag in raw_model_answer:
                model_answer = model_answer.split("\n")[0].split(". ")[0]
    elif model_answer.count("oxed{") > 1:
        model_answer = "\\boxed{" + model_answer.split("oxed{")[-1]
    model_answer = (find_math_answer(model_answer).replace("(a)", "a").replace("(b)", "b").replace("(c)", "c")
                    .replace("(d)", "d").replace("(e)", "e").replace("{a}", "a").replace("{b}", "b").replace("{c}", "c")
                    .replace("{d}", "d").replace("{e}", "e").rstrip(".").lstrip(":").strip())
    return model_answer


class MathVision(Benchmark):
    name = "mathvision"
    title = "MATH-Vision"
    official = "mathllm/MATH-V evaluation/evaluate.py + evaluation/utils.py"
    id_fields = ("id",)

    @classmethod
    def detect(cls, columns: set[str]) -> bool:
        return ({"level", "subject", "answer"} <= columns or {"category", "choices", "answer"} <= columns) and not (
            {"problem_version", "question_type"} & columns)  # the HF/GitHub files; VLMEvalKit's MathVision.tsv

    def _repair(self, value: str, item_id: str, field: str) -> str:
        if "\x0c" in value:
            fixed = value.replace("\x0c", "\\f")
            self.repairs.append({"id": item_id, "field": field, "was": value, "now": fixed})
            return fixed
        return value

    def item(self, rec: dict[str, Any], base: Path, where: str) -> Item:
        item_id = self.id_of(rec, where)
        options = str_list(rec.get("options", rec.get("choices")), where, "options") or []
        options = [self._repair(o, item_id, "options") for o in options]
        answer = self._repair(text(rec, "answer", where), item_id, "answer")
        question = text(rec, "question", where)
        prompt = question if vlmevalkit(rec) else build_prompt(question, options)
        return Item(id=item_id, question=question, answer=answer, prompt=prompt, images=images_of(rec, base, where),
                    groups={"subject": values(rec.get("subject", rec.get("category"))), "level": values(rec.get("level"))},
                    meta={"options": options}, record=plain(rec), where=where)

    def score(self, item: Item, prediction: str, lenient: bool = False) -> Scored:
        options = item.meta["options"]
        gt = item.answer
        gt_value = options[ord(gt) - ord("A")] if options and len(gt) == 1 and 0 <= ord(gt) - ord("A") < len(options) else ""
        extracted = model_answer(prediction)
        correct = is_equal(gt, extracted) or is_equal(gt_value, extracted)
        loose = None if not lenient else correct or lenient_equal(extract_answer(prediction), gt, options or None)
        return Scored(extracted=extracted, correct=correct, lenient=loose)
