"""Answer extraction and scoring against expected literals."""

from decimal import Decimal

import pytest

from deltakit.answers import extract_answer, last_boxed, match_choice, normalize_text, parse_number, score


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{ {a} + {b} }", " {a} + {b} "),
    (r"\fbox{7}", "7"),
    (r"\boxed{unclosed", None),
    ("no box here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("output,expected", [
    (r"<think>maybe \boxed{3}</think> The answer is \boxed{4}.", "4"),
    (r"<think>it is \boxed{3}</think>", "3"),  # nothing after </think>: the whole output is used
    ("<think>count</think> The answer is 12.", "12"),
    ("Reasoning...\nFinal answer: (B) 145°\nDone", "(B) 145°"),
    ("Answer: blue.", "blue"),
    ("the correct option is C.", "C"),
    ("  just 5  ", "just 5"),
])
def test_extract_answer(output, expected):
    assert extract_answer(output) == expected


@pytest.mark.parametrize("text,expected", [
    ("1,234", Decimal("1234")), ("-3.50 cm", Decimal("-3.50")), ("between 2 and 7", Decimal("7")),
    (r"\frac{3}{4}", Decimal("0.75")), ("3/8", Decimal("0.375")), ("45\\%", Decimal("45")), ("seven", Decimal("7")),
    (".5", Decimal("0.5")), ("none", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_normalize_text():
    assert normalize_text(r"  The \text{Red} Circle. ") == "red circle"
    assert normalize_text("$x$") == "x"
    assert normalize_text("An  apple!") == "apple"


CHOICES = ["120°", "145°", "160°", "none of these"]


@pytest.mark.parametrize("answer,expected", [
    ("B", "145°"), ("(B)", "145°"), ("B.", "145°"), ("option C", "160°"), ("(B) 145°", "145°"),
    ("145°", "145°"), ("None of these", "none of these"), ("it is 160° I think", "160°"),
    ("(B) 120°", "120°"),  # a letter that contradicts its text falls back to the text
    ("E", None), ("b", None), ("120° or 145°", None),
])
def test_match_choice(answer, expected):
    assert match_choice(answer, CHOICES) == expected


@pytest.mark.parametrize("output,answer,kind,choices,precision,expected", [
    (r"\boxed{B}", "145°", "multi_choice", CHOICES, None, ("145°", True)),
    (r"\boxed{A}", "145°", "multi_choice", CHOICES, None, ("120°", False)),
    (r"\boxed{B}", "B", "multi_choice", CHOICES, None, ("145°", True)),  # reference given as a letter
    (r"\boxed{Z}", "145°", "multi_choice", CHOICES, None, (None, False)),
    ("The answer is 3.", "3", "integer", None, None, ("3", True)),
    (r"\boxed{3.0}", "3", "integer", None, None, ("3", True)),
    (r"\boxed{4}", "3", "integer", None, None, ("4", False)),
    ("no number", "3", "integer", None, None, (None, False)),
    (r"\boxed{2.449}", "2.45", "float", None, None, ("2.45", True)),  # precision from the answer's decimals
    (r"\boxed{2.444}", "2.45", "float", None, None, ("2.44", False)),
    (r"\boxed{1.25}", "1.3", "float", None, 1, ("1.3", True)),  # half-up rounding
    (r"\boxed{1.24}", "1.3", "float", None, 1, ("1.2", False)),
    (r"\boxed{\frac{1}{3}}", "0.33", "float", None, 2, ("0.33", True)),
    (r"\boxed{7}", "7.0", "float", None, 1, ("7.0", True)),
    (r"\boxed{\text{Blue}}", "blue", "text", None, None, ("blue", True)),
    ("Answer: the red one", "red", "text", None, None, ("red one", False)),
    (r"\boxed{}", "red", "text", None, None, (None, False)),
])
def test_score(output, answer, kind, choices, precision, expected):
    assert score(output, answer, kind, choices, precision) == expected


def test_unknown_answer_type():
    with pytest.raises(ValueError, match="unknown answer_type 'list'"):
        score("1", "1", "list")


@pytest.mark.parametrize("output,answer,kind,precision", [
    ("\\boxed{" + "9" * 40 + "}", "5.5", "float", 1),  # quantize to 41 digits > the context's 28: InvalidOperation
    ("\\boxed{" + "7" * 1_000_001 + "}", "3", "integer", None),  # normalize past Emax (999999): Overflow
    ("\\boxed{\\frac{1}{0." + "0" * 1_000_000 + "1}}", "3", "integer", None),  # the quotient overflows
    (r"\boxed{1}", "1", "float", 10**7),  # scaleb below Emin: InvalidOperation
], ids=["40-digit-float", "million-digit-integer", "overflowing-fraction", "huge-precision"])
def test_number_too_long_to_compare_is_wrong_not_an_error(output, answer, kind, precision):
    assert score(output, answer, kind, None, precision) == (None, False)


def test_long_number_within_the_context_still_compares():
    # 26 significant digits after rounding: within the 28-digit context, so scored as usual.
    assert score(r"\boxed{123456789012345678901234.55}", "123456789012345678901234.6", "float") == (
        "123456789012345678901234.6", True)


@pytest.mark.parametrize("extracted,gold,kw,expected", [
    (r"\frac{1}{2}", "0.5", {"precision": 1}, True),  # math-verify: 1/2 == 0.5
    ("12 cm", "12", {}, True),  # a trailing unit word after a number
    (r"45^\circ", "45", {}, True),
    (r"3\text{ m}", "3", {"unit": "m"}, True),
    ("13", "12", {}, False),
    (r"\boxed{B}", "145°", {"choices": CHOICES}, True),  # a boxed letter names the choice
    ("B. 145°", "B", {"choices": CHOICES}, True),
    ("C", "145°", {"choices": CHOICES}, False),
    ("", "1", {}, False),
    (None, "1", {}, False),
])
def test_lenient_equal(extracted, gold, kw, expected):
    from deltakit.answers import lenient_equal

    assert lenient_equal(extracted, gold, **kw) is expected


def test_strip_units():
    from deltakit.answers import strip_units

    assert strip_units("12 cm") == "12" and strip_units(r"5\%") == "5" and strip_units("x + y") == "x + y"
    assert strip_units(r"3.5\text{ meters}.") == "3.5" and strip_units("7 apples", unit="apples") == "7"
