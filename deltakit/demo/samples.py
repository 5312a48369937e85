"""A small five-task sample dataset for tests and examples: :func:`write_demo_data` (moved here from ``deltakit.data``).

Not the miniature study's task (that is :mod:`deltakit.demo.task`): five one-step tasks on generated images
(counting colored shapes, reading a number, averaging two numbers, naming a color, picking a shape among
choices), enough to exercise every data, training and evaluation path on tiny models.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from deltakit.evaluate import BenchItem, build_prompt

_COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (235, 200, 30)}
_SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class DemoData:
    """Where :func:`write_demo_data` put the training JSONL (sharegpt), the evaluation JSONL (MathVista-style) and the images."""

    train: Path
    bench: Path
    images: Path
    n_train: int
    n_bench: int


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _demo_item(rng: random.Random, task: str) -> tuple[Image.Image, dict[str, Any], str]:
    """One synthetic problem of ``task``: the image, its MathVista-style record (no id/image yet), the reasoning."""
    from PIL import ImageFont

    if task == "counting":
        img = Image.new("RGB", (112, 112), "white")
        draw = ImageDraw.Draw(img)
        cells = sorted(rng.sample(range(9), rng.randint(2, 6)))  # listed in reading order
        shapes = [(rng.choice(list(_COLORS)), rng.choice(_SHAPES)) for _ in cells]
        for cell, (color, kind) in zip(cells, shapes):
            x, y = 37 * (cell % 3) + 4, 37 * (cell // 3) + 4
            _draw_shape(draw, kind, (x, y, x + 29, y + 29), _COLORS[color])
        target = rng.choice(shapes)[0]
        n = sum(c == target for c, _ in shapes)
        listing = ", ".join(f"a {c} {k}" for c, k in shapes)
        return img, {"question": f"How many {target} shapes are there in the image?", "answer": str(n),
                     "answer_type": "integer", "category": "counting"}, \
            f"I look at each shape: {listing}. The {target} ones: {n}."
    if task in ("digits", "average"):
        img = Image.new("RGB", (112, 56), "white")
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=30)
        if task == "digits":
            n = rng.randint(10, 999)
            draw.text((8, 10), str(n), fill="black", font=font)
            digits = ", ".join(str(n))
            return img, {"question": "What number is written in the image?", "answer": str(n),
                         "answer_type": "integer", "category": "digits"}, \
                f"The digits from left to right are {digits}. So the number is {n}."
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        draw.text((8, 10), f"{a}  {b}", fill="black", font=font)
        mean = (a + b) / 2
        return img, {"question": "What is the average of the two numbers in the image?", "answer": f"{mean:.1f}",
                     "answer_type": "float", "precision": 1, "category": "average"}, \
            f"The numbers are {a} and {b}. Their sum is {a + b}, and {a + b} / 2 = {mean:.1f}."
    img = Image.new("RGB", (56, 56), "white")
    color, kind = rng.choice(list(_COLORS)), rng.choice(_SHAPES)
    _draw_shape(ImageDraw.Draw(img), kind, (6, 6, 50, 50), _COLORS[color])
    if task == "color":
        return img, {"question": "What color is the shape?", "answer": color, "answer_type": "text", "category": "color"}, \
            f"The image shows one shape, a {color} {kind}. Its color is {color}."
    choices = list(_SHAPES)
    rng.shuffle(choices)
    letter = "ABC"[choices.index(kind)]
    return img, {"question": "Which shape is in the image?", "choices": choices, "answer": kind,
                 "answer_type": "multi_choice", "category": "shape"}, \
        f"The image shows one {color} {kind}. Among the choices that is option ({letter})."


DEMO_TASKS = ("counting", "digits", "average", "color", "shape")


def write_demo_data(folder: str | os.PathLike, n: int = 64, seed: int = 0, n_bench: int | None = None) -> DemoData:
    """Write a small synthetic multimodal chain-of-thought dataset into ``folder``.

    Five tasks on generated images (counting colored shapes, reading a number, averaging two numbers,
    naming a color, picking a shape among choices), cycled in order. ``train.jsonl`` (``n`` records,
    sharegpt: ``messages`` with an ``<image>`` placeholder and ``images``) has answers of the form
    ``<think>reasoning</think> The answer is \\boxed{X}`` (X the option letter for multiple choice);
    its prompts are the ones ``deltakit eval`` builds. ``bench.jsonl`` (``n_bench`` records, default
    ``max(10, n // 4)``, drawn after the training records from the same generator) is MathVista-style for
    ``deltakit eval``. Deterministic for a seed.
    """
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    n_bench = max(10, n // 4) if n_bench is None else n_bench
    rng = random.Random(seed)
    files = {"train.jsonl": [], "bench.jsonl": []}
    for split, count in (("train", n), ("bench", n_bench)):
        for i in range(count):
            img, rec, think = _demo_item(rng, DEMO_TASKS[i % len(DEMO_TASKS)])
            name = f"images/{split}-{i:05d}.png"
            img.save(root / name)
            rec = {"id": f"{split}-{i}", "image": name, **rec}
            if split == "bench":
                files["bench.jsonl"].append(rec)
                continue
            item = BenchItem.from_record(rec, root, f"{root / 'train.jsonl'}:{i + 1}")
            final = "ABC"[rec["choices"].index(rec["answer"])] if rec.get("choices") else rec["answer"]
            files["train.jsonl"].append({
                "messages": [{"role": "user", "content": "<image>" + build_prompt(item)},
                             {"role": "assistant", "content": f"<think>{think}</think> The answer is \\boxed{{{final}}}."}],
                "images": [name]})
    for name, records in files.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return DemoData(root / "train.jsonl", root / "bench.jsonl", root / "images", n, n_bench)
