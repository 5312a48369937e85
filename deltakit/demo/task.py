"""The miniature world's synthetic language and its multi-step visual task (see ``docs/study.md``).

An image shows four digits in a row (rendered with jitter in position and ink). A question names three
operations, applied left to right: ``first plus second, then times third, then minus fourth.`` In the
synthetic language every operation is taken modulo 10 (``7 plus 8 is 5``), so every number is one digit
and the answer is one of ten. Answering takes four steps: read the digits, then three operations, each
needing the previous result; the chain of thought writes every step:

    <think>The numbers are 7 8 3 2. 7 plus 8 is 5. 5 times 3 is 5. 5 minus 2 is 3.</think> The answer is \\boxed{3}.

Who learns what (:mod:`deltakit.demo.family`):

- the **base LM** is trained on the language (:func:`base_corpus`): arithmetic drills, one-step questions about
  numbers given in text (``second times fourth.`` -> ``The answer is \\boxed{6}.``) and reading numbers written
  together, no chain of thought;
- the **reasoner** is the base trained further on the text chain of thought of the three-step questions
  (:func:`text_cot`);
- the **MLLMs** learn to see: transcribe the image (``The numbers are 7 8 3 2.``) and one-step questions
  about it (:func:`perception`; the far one also :data:`FAR_KINDS`), never the three-step task;
- the **study** fine-tunes the MLLMs on a small multimodal chain-of-thought set (:func:`write_task_data`) and
  tests them on held-out multimodal questions.

Problems are split by identity: :func:`in_test_split` holds out one (digits, operations) combination in
ten, and every test and held-out item comes from that part, every training item (of any model) from the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

N_DIGITS = 4
OPS = ("plus", "minus", "times")
ORDINALS = ("first", "second", "third", "fourth")
IMAGE_SIZE = (112, 28)
"""Width x height: at the tiny processor's patch 14 and 2 x 2 merge, 8 x 2 patches, 4 image tokens: one per digit."""
FAR_KINDS = ("reverse", "largest", "odd")
"""The far MLLM's extra multimodal tasks (another distribution than the close one's, see ``docs/study.md``)."""


def apply(op: str, x: int, y: int) -> int:
    """``x op y`` in the synthetic language: modulo 10."""
    if op == "plus":
        return (x + y) % 10
    if op == "minus":
        return (x - y) % 10
    if op == "times":
        return (x * y) % 10
    raise ValueError(f"unknown operation {op!r}")


@dataclass(frozen=True)
class Problem:
    """Four digits and three operations: ``((d0 op0 d1) op1 d2) op2 d3``."""

    digits: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def steps(self) -> list[tuple[int, str, int, int]]:
        """``(x, op, y, x op y)`` for each of the three operations, in order."""
        out, value = [], self.digits[0]
        for op, y in zip(self.ops, self.digits[1:]):
            result = apply(op, value, y)
            out.append((value, op, y, result))
            value = result
        return out

    @property
    def answer(self) -> int:
        return self.steps[-1][3]

    @property
    def listing(self) -> str:
        return "The numbers are " + " ".join(map(str, self.digits)) + "."

    def query(self) -> str:
        """The question (the same words with or without an image)."""
        o = self.ops
        return f"first {o[0]} second, then {o[1]} third, then {o[2]} fourth."

    def cot(self) -> str:
        """The chain-of-thought answer."""
        steps = " ".join(f"{x} {op} {y} is {r}." for x, op, y, r in self.steps)
        return f"<think>{self.listing} {steps}</think> The answer is \\boxed{{{self.answer}}}."


def in_test_split(digits: tuple[int, ...], ops: tuple[str, ...]) -> bool:
    """Whether a (digits, operations) combination belongs to the held-out part (one in ten, by a hash)."""
    key = ",".join(map(str, digits)) + ":" + ",".join(ops)
    return hashlib.blake2b(key.encode(), digest_size=2).digest()[0] % 10 == 0


def draw_problem(rng: random.Random, test: bool) -> Problem:
    """A random problem from the test or the training part."""
    while True:
        digits = tuple(rng.randrange(10) for _ in range(N_DIGITS))
        ops = tuple(rng.choice(OPS) for _ in range(N_DIGITS - 1))
        if in_test_split(digits, ops) == test:
            return Problem(digits, ops)


def render_digits(digits: tuple[int, ...], rng: random.Random) -> Image.Image:
    """The four digits on a white 112 x 28 image, one per 28 x 28 square (one image token each), each with its own small offset and ink."""
    img = Image.new("RGB", IMAGE_SIZE, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=rng.choice((20, 22, 24)))
    for i, d in enumerate(digits):
        ink = tuple(rng.randrange(0, 90) for _ in range(3))
        draw.text((28 * i + 2 + rng.randrange(10), rng.randrange(-4, 2)), str(d), fill=ink, font=font)
    return img


# -- what each model of the family is trained on ------------------------------------------------------------

def _fact(rng: random.Random) -> str:
    op, x, y = rng.choice(OPS), rng.randrange(10), rng.randrange(10)
    return f"{x} {op} {y} is {apply(op, x, y)}."


def _one_step(rng: random.Random, digits: tuple[int, ...]) -> tuple[str, str]:
    """A one-step question about four numbers and its direct answer."""
    i, j = rng.sample(range(N_DIGITS), 2)
    op = rng.choice(OPS)
    return f"{ORDINALS[i]} {op} {ORDINALS[j]}.", f"The answer is \\boxed{{{apply(op, digits[i], digits[j])}}}."


def base_corpus(rng: random.Random) -> Iterator[list[dict[str, str]]]:
    """The base LM's training stream, all chats, so every trained token is determined by the prompt (random operands
    in trained text bury the facts' signal; see ``docs/study.md``), in a fixed 3 : 1 : 1 cycle: arithmetic drills
    (``7 plus 8.`` -> ``7 plus 8 is 5.``), one-step questions about numbers given in text answered directly, and
    reading numbers written together (``7832. What are the numbers?`` -> ``The numbers are 7 8 3 2.``: one token per
    digit, as the MLLMs' images give one image token per digit)."""
    i = 0
    while True:
        kind = ("drill", "drill", "drill", "one_step", "read")[i % 5]
        i += 1
        digits = tuple(rng.randrange(10) for _ in range(N_DIGITS))
        listing = "The numbers are " + " ".join(map(str, digits)) + "."
        if kind == "drill":
            op, x, y = rng.choice(OPS), rng.randrange(10), rng.randrange(10)
            yield [{"role": "user", "content": f"{x} {op} {y}."},
                   {"role": "assistant", "content": f"{x} {op} {y} is {apply(op, x, y)}."}]
        elif kind == "one_step":
            q, a = _one_step(rng, digits)
            yield [{"role": "user", "content": f"{listing} {q}"}, {"role": "assistant", "content": a}]
        else:
            yield [{"role": "user", "content": "".join(map(str, digits)) + ". What are the numbers?"},
                   {"role": "assistant", "content": listing}]


def text_cot(rng: random.Random, test: bool = False) -> Iterator[list[dict[str, str]]]:
    """The reasoner's training stream: three-step questions with the numbers in text, answered with the chain of thought."""
    while True:
        p = draw_problem(rng, test)
        yield [{"role": "user", "content": f"{p.listing} {p.query()}"}, {"role": "assistant", "content": p.cot()}]


def perception(rng: random.Random, kinds: tuple[str, ...] = ()) -> Iterator[tuple[Image.Image, str, str]]:
    """An MLLM's training stream, ``(image, question, answer)``: transcription and one-step questions about the
    image (1 : 1), plus, cycled in, each of ``kinds`` (:data:`FAR_KINDS`: the digits right to left, the largest
    digit, how many are odd). Images come from the training part only."""
    cycle = ("transcribe", "one_step", *kinds)
    i = 0
    while True:
        p = draw_problem(rng, test=False)
        img = render_digits(p.digits, rng)
        kind = cycle[i % len(cycle)]
        i += 1
        if kind == "transcribe":
            yield img, "What are the numbers?", p.listing
        elif kind == "one_step":
            yield (img, *_one_step(rng, p.digits))
        elif kind == "reverse":
            yield img, "Read the numbers from right to left.", "From right to left: " + " ".join(map(str, p.digits[::-1])) + "."
        elif kind == "largest":
            yield img, "Which number is the largest?", f"The largest is \\boxed{{{max(p.digits)}}}."
        elif kind == "odd":
            yield img, "How many numbers are odd?", f"There are \\boxed{{{sum(d % 2 for d in p.digits)}}} odd numbers."
        else:
            raise ValueError(f"unknown perception task {kind!r}")


# -- the study's data ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskData:
    """Where :func:`write_task_data` put the study's files (all JSONL, images relative to the folder)."""

    root: Path
    train: Path
    """Multimodal chain-of-thought training set (sharegpt: ``<image>`` + question, the CoT answer)."""
    test: Path
    """Multimodal test set in the eval format (``query``, ``image``, ``answer``, ``answer_type: integer``)."""
    heldout: Path
    """Held-out multimodal CoT conversations (sharegpt) for the held-out CoT loss."""
    text_test: Path
    """The test set's problems with the numbers in text and no image (the reasoner's own test)."""
    n_train: int
    n_test: int
    n_heldout: int


def bench_record(p: Problem, ident: str, image: str | None) -> dict[str, Any]:
    """A MathVista-style record of a problem: with an image, or (``image`` None) with the numbers in the text."""
    rec: dict[str, Any] = {"id": ident, "question": p.query(), "query": p.query() if image else f"{p.listing} {p.query()}",
                           "answer": str(p.answer), "answer_type": "integer", "category": "+".join(p.ops),
                           "digits": list(p.digits), "ops": list(p.ops)}
    if image:
        rec["image"] = image
    return rec


def write_task_data(folder: str | os.PathLike, n_train: int, n_test: int, n_heldout: int, seed: int) -> TaskData:
    """Write the study's data into ``folder`` (deterministic for ``seed``): a multimodal CoT training set of
    ``n_train`` (training part), ``n_test`` test questions and ``n_heldout`` held-out CoT conversations (test part)."""
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"task:{seed}")
    lines: dict[str, list[str]] = {"train.jsonl": [], "test.jsonl": [], "heldout.jsonl": [], "text_test.jsonl": []}
    for split, count in (("train", n_train), ("test", n_test), ("heldout", n_heldout)):
        for i in range(count):
            p = draw_problem(rng, test=split != "train")
            name = f"images/{split}-{i:05d}.png"
            render_digits(p.digits, rng).save(root / name)
            if split == "test":
                lines["test.jsonl"].append(json.dumps(bench_record(p, f"test-{i}", name)))
                lines["text_test.jsonl"].append(json.dumps(bench_record(p, f"text-{i}", None)))
            else:
                lines[f"{split}.jsonl"].append(json.dumps({
                    "messages": [{"role": "user", "content": "<image>" + p.query()},
                                 {"role": "assistant", "content": p.cot()}], "images": [name]}))
    for name, records in lines.items():
        (root / name).write_text("".join(r + "\n" for r in records))
    return TaskData(root, root / "train.jsonl", root / "test.jsonl", root / "heldout.jsonl", root / "text_test.jsonl",
                    n_train, n_test, n_heldout)


def vocabulary_corpus() -> list[str]:
    """Lines with every word and number form of the language, for the tokenizer (so each is few tokens)."""
    rng = random.Random("vocabulary")
    lines = []
    for _ in range(600):
        p = draw_problem(rng, rng.random() < 0.1)
        q, a = _one_step(rng, p.digits)
        lines += [f"{p.listing} {p.query()} {p.cot()}", f"{q} {a} {_fact(rng)}",
                  "What are the numbers? Read the numbers from right to left. From right to left: Which number is the "
                  "largest? The largest is How many numbers are odd? There are odd numbers."]
    return lines
