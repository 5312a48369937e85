"""Answer extraction and scoring for ``deltakit eval`` (rules in ``docs/eval.md``).

A model output is reduced to one answer string: the text after the last ``</think>`` (when any is left),
then the content of the last ``\\boxed{...}`` (nested braces allowed), else what follows the last
final-answer phrase ("The answer is ...", "Answer: ..."), else the whole remaining text. That string is
then compared by answer type: ``multi_choice`` (a letter maps to the choice, or the choice text itself),
``integer`` and ``float`` (the last number in it; floats rounded half-up to the stated precision) and
``text`` (normalised: case, articles, punctuation, LaTeX ``\\text{}``). A number that cannot be compared
(too many digits for the decimal context: a degenerate output such as a thousand-digit ``\\boxed{}``) gives
no prediction and is scored wrong, never an error.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, Overflow

ANSWER_TYPES = ("integer", "float", "text", "multi_choice")
# What decimal arithmetic on a parsed number can raise under the default context (28 digits, traps on
# InvalidOperation, DivisionByZero and Overflow; division by zero is never attempted): ``quantize`` to more
# digits than the context holds and ``scaleb`` past its exponent range raise InvalidOperation, ``normalize``
# or a quotient past Emax raise Overflow.
_DECIMAL_ERRORS = (InvalidOperation, Overflow)

_PHRASE = re.compile(r"(?:final answer|the answer|correct answer|correct option|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.I)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}")
_LETTER = re.compile(r"^(?:(?i:option|choice)\s*)?\(?([A-Z])\)?[.:]?(?:\s+(.*))?$", re.S)
_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                     "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if there is none."""
    found = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end():i - 1]
    return found


def extract_answer(output: str) -> str:
    """The answer part of a model output (see the module docstring); stripped, possibly empty."""
    tail = output.rsplit("</think>", 1)[-1]
    text = tail if tail.strip() else output.replace("<think>", "").replace("</think>", "")
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    phrases = list(_PHRASE.finditer(text))
    if phrases:
        answer = phrases[-1].group(1).strip().splitlines()[0]
        return answer.strip().rstrip(".").strip()
    return text.strip()


def _unlatex(s: str) -> str:
    s = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\%", "%").replace("^\\circ", "°").replace("^{\\circ}", "°").replace("\\,", "").replace("$", "")
    return s.replace("\\left", "").replace("\\right", "")


def normalize_text(s: str) -> str:
    """Lower case, LaTeX text wrappers and ``$`` removed, articles and outer punctuation dropped, spaces collapsed."""
    s = _unlatex(s).lower().strip()
    s = re.sub(r"\b(?:a|an|the)\b", " ", s)
    s = re.sub(r"\s+", " ", s).strip()
    return s.strip(" .,;:!?'\"`()[]")


def parse_number(s: str) -> Decimal | None:
    """The last number in ``s`` (thousands separators, ``\\frac{a}{b}`` and ``a/b`` understood; a number word
    up to twenty when no digit is present), or None."""
    s = _unlatex(s)
    frac = list(_FRAC.finditer(s))
    plain = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*", s)
    pair = (frac[-1].group(1), frac[-1].group(2)) if frac else (plain.group(1), plain.group(2)) if plain else None
    try:
        if pair and Decimal(pair[1]) != 0:
            return Decimal(pair[0]) / Decimal(pair[1])
        numbers = _NUMBER.findall(s)
        if numbers:
            return Decimal(numbers[-1].replace(",", ""))
    except _DECIMAL_ERRORS:
        return None
    words = [w for w in re.findall(r"[a-z]+", s.lower()) if w in _WORDS]
    return Decimal(_WORDS[words[-1]]) if words else None


def decimals(s: str) -> int:
    """Digits after the decimal point in the number written in ``s`` (0 for an integer)."""
    m = _NUMBER.findall(s)
    return len(m[-1].split(".")[1]) if m and "." in m[-1] else 0


def match_choice(answer: str, choices: list[str]) -> str | None:
    """The choice an extracted answer names: by letter ("B", "(B)", "B.", "option B"), by its normalised
    text, or the one choice whose text it contains; None when it names none or several."""
    letter = _LETTER.match(answer.strip())
    if letter and ord(letter.group(1)) - ord("A") < len(choices):
        choice = choices[ord(letter.group(1)) - ord("A")]
        if letter.group(2) is None or normalize_text(letter.group(2)) == normalize_text(choice):
            return choice
    norm = normalize_text(answer)
    for choice in choices:
        if normalize_text(choice) == norm:
            return choice
    inside = [c for c in choices if re.search(rf"(?<!\w){re.escape(normalize_text(c))}(?!\w)", norm)]
    return inside[0] if len(inside) == 1 else None


def score(output: str, answer: str, answer_type: str, choices: list[str] | None = None,
          precision: int | None = None) -> tuple[str | None, bool]:
    """``(prediction, correct)`` for one model output: the normalised prediction (None when nothing usable
    was found) and whether it equals the reference ``answer``."""
    extracted = extract_answer(output)
    if answer_type == "multi_choice":
        choices = choices or []
        reference = match_choice(answer, choices) if answer not in choices else answer
        picked = match_choice(extracted, choices)
        return picked, picked is not None and picked == reference
    if answer_type in ("integer", "float"):
        value, ref = parse_number(extracted), parse_number(answer)
        if value is None or ref is None:
            return None, False
        try:
            if answer_type == "integer":
                return str(value.normalize()), value == ref
            places = Decimal(1).scaleb(-(decimals(answer) if precision is None else precision))
            rounded = value.quantize(places, rounding=ROUND_HALF_UP)
            return str(rounded), rounded == ref.quantize(places, rounding=ROUND_HALF_UP)
        except _DECIMAL_ERRORS:  # a number too long to round or print: no usable prediction
            return None, False
    if answer_type == "text":
        pred = normalize_text(extracted)
        return (pred or None), bool(pred) and pred == normalize_text(answer)
    raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {', '.join(ANSWER_TYPES)}")


# --- deltakit's lenient mode (docs/scoring.md): reported beside each benchmark's official score -------------

_UNIT_TAIL = re.compile(r"(?:\\(?:text|mathrm|mbox)\{\s*[^{}]*\}|°|\\circ|\^\{?\\circ\}?|\\%|%|\s+[a-zA-Z]{1,12}(?:\^?[23])?\.?)\s*$")


def strip_units(s: str, unit: str | None = None) -> str:
    """``s`` without a trailing unit: the benchmark's ``unit`` when given, ``\\text{...}``, degrees, percent, or a
    short trailing word after a number (``12 cm``, ``3.5 meters``)."""
    s = s.strip().rstrip(".").strip().replace("$", "")
    if unit and s.endswith(unit):
        s = s[: -len(unit)].strip()
    for _ in range(3):
        t = _UNIT_TAIL.sub("", s).strip()
        if not t or t == s or not re.search(r"\d", t):
            break
        s = t
    return s


def lenient_equal(extracted: str | None, gold: str, choices: list[str] | None = None, unit: str | None = None,
                  precision: int | None = None) -> bool:
    """deltakit's lenient verdict: with ``choices``, the letter or text the answer names (``\\boxed{B}``, ``(B)``,
    ``B. text``) is the gold choice; otherwise math-verify finds the two equal once units are stripped
    (``\\frac{1}{2}`` == ``0.5``; numbers compared at ``precision`` decimals, default 6). Never raises."""
    from deltakit.benchmarks.mathcheck import equivalent

    if not extracted or not gold:
        return False
    extracted = last_boxed(extracted) or extracted
    if choices:
        letters = [chr(65 + i) for i in range(len(choices))]
        want = choices[letters.index(gold)] if gold in letters else gold
        return match_choice(extracted, choices) == want
    a, b = strip_units(extracted, unit), strip_units(gold, unit)
    if not a or not b:
        return False
    if normalize_text(a) == normalize_text(b):
        return True
    return equivalent(b, a, float_rounding=6 if precision is None else int(precision))
