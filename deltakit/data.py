"""Training data: multimodal chat JSONL -> tokenised examples with assistant-only labels (see ``docs/data.md``).

Two JSONL formats are read, one record per line, images by path relative to the JSONL file:

- LLaMA-Factory sharegpt: ``{"messages": [{"role": ..., "content": "<image>..."}], "images": [...]}``
  (or ``"conversations"`` with ``from``/``value``, and an optional top-level ``"system"``); each
  ``<image>`` placeholder takes the next path of ``images``.
- typed content (transformers / TRL): ``content`` is a list of ``{"type": "text", "text": ...}`` and
  ``{"type": "image", "image" | "path" | "url": ...}`` parts; an image part without a path takes the
  next path of a top-level ``images`` list.

Both become the same :class:`Example` (so the same tensors). :class:`SFTDataset` renders each with the
model's own chat template and processor; only the assistant turns' tokens (their text, ``<think>``
included, and the template's end-of-turn token) are trained, every other position is ``-100``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from deltakit.errors import DeltakitError

IGNORE = -100
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_IMAGE_KEYS = ("image", "path", "url")
# Per-token tensors (padded in collate); every other tensor of an example is per image and concatenated.
_TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids", "token_type_ids")


class DataError(DeltakitError):
    """A training or evaluation record that cannot be used (the message starts with ``file:line``)."""


@dataclass(frozen=True)
class Example:
    """One conversation: ``messages`` with ``role`` and ``content`` (a string, or a list of parts when it has
    images: ``{"type": "image"}`` and ``{"type": "text", "text": ...}``), the image files in order of their
    parts, and ``where`` (``file:line``) for error messages."""

    messages: list[dict[str, Any]]
    images: list[Path] = field(default_factory=list)
    where: str = ""


def resolve_image(value: Any, base: Path, where: str) -> Path:
    """The local file an image reference names (relative to ``base``; ``file://`` accepted), checked to be readable."""
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: an image must be given as a path string, got {value!r}")
    if value.startswith(("http://", "https://")):
        raise DataError(f"{where}: remote image {value!r}: download it and give a local path")
    path = base / value.removeprefix("file://")
    shown = str(path) if str(path).isprintable() else repr(str(path))
    try:
        found = path.is_file()
    except OSError as exc:  # a name too long for the file system ...
        raise DataError(f"{where}: image {shown[:100]}{'...' if len(shown) > 100 else ''}: {exc.strerror}") from None
    if not found:
        raise DataError(f"{where}: image not found: {shown}")
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - reads the header only
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: cannot read image {shown}: {exc}") from None
    return path


def open_image(path: Path, where: str = "") -> Image.Image:
    """The image at ``path`` as RGB."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot read image {path}: {exc}") from None


def _parts(content: Any, where: str) -> list[dict[str, Any]]:
    """A message's content as parts; a string is split at ``<image>`` placeholders."""
    if isinstance(content, str):
        parts: list[dict[str, Any]] = []
        for i, text in enumerate(content.split("<image>")):
            if i:
                parts.append({"type": "image", "ref": None})
            parts.append({"type": "text", "text": text})
        return parts
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise DataError(f"{where}: message content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "image_url"):
            ref = next((part[k] for k in (*_IMAGE_KEYS, "image_url") if part.get(k) is not None), None)
            if isinstance(ref, dict):
                ref = ref.get("url")
            out.append({"type": "image", "ref": ref})
        elif kind == "video":
            raise DataError(f"{where}: video parts are not supported")
        else:
            raise DataError(f"{where}: content part {json.dumps(part)[:80]} is neither "
                            "{'type': 'text', 'text': ...} nor {'type': 'image', ...}")
    return out


def _canonical(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Merge adjacent text, drop empty text; a text-only content becomes a plain string."""
    merged: list[dict[str, Any]] = []
    for part in parts:
        if part["type"] == "text":
            if not part["text"]:
                continue
            if merged and merged[-1]["type"] == "text":
                merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
                continue
        merged.append(part)
    if all(p["type"] == "text" for p in merged):
        return "".join(p["text"] for p in merged)
    return merged


def parse_record(record: Any, base: Path, where: str) -> Example:
    """One JSONL record (either format) as an :class:`Example`; ``base`` is the folder image paths are relative to."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object")
    raw = record.get("messages", record.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: no 'messages' (or 'conversations') list")
    listed = record.get("images") or []
    if isinstance(listed, str):
        listed = [listed]
    if not isinstance(listed, list):
        raise DataError(f"{where}: 'images' must be a list of paths")
    if record.get("videos"):
        raise DataError(f"{where}: videos are not supported")
    messages: list[dict[str, Any]] = []
    if isinstance(record.get("system"), str) and record["system"]:
        messages.append({"role": "system", "content": record["system"]})
    parsed = []
    for msg in raw:
        if not isinstance(msg, dict):
            raise DataError(f"{where}: each message must be an object")
        name = msg.get("role", msg.get("from"))
        role = _ROLES.get(name) if isinstance(name, str) else None
        if role is None:
            raise DataError(f"{where}: unknown role {msg.get('role', msg.get('from'))!r}; expected one of {', '.join(_ROLES)}")
        parsed.append((role, _parts(msg.get("content", msg.get("value")), where)))
    unnamed = sum(p["type"] == "image" and p["ref"] is None for _, parts in parsed for p in parts)
    if unnamed != len(listed):
        raise DataError(f"{where}: {unnamed} image placeholders but {len(listed)} paths in 'images'")
    pending = iter(listed)
    images: list[Path] = []
    for role, parts in parsed:
        for part in parts:
            if part["type"] == "image":
                ref = part.pop("ref")
                images.append(resolve_image(next(pending) if ref is None else ref, base, where))
        messages.append({"role": role, "content": _canonical(parts)})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to train on")
    return Example(messages, images, where)


def iter_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[dict[str, Any], str]]:
    """``(record, "file:line")`` for each non-blank line of a JSONL file of ``what`` (e.g. "training data").

    A missing file or a line that is not JSON raises :class:`DataError` naming the file (and line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    with path.open("rb") as fh:  # lines split at \n only, each decoded on its own so an error names its line
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 (byte {exc.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
            except ValueError:  # an integer past Python's 4300-digit conversion limit
                raise DataError(f"{where}: not valid JSON (a number with too many digits)") from None
            yield record, where


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Every record of a training JSONL (blank lines skipped); a bad record raises :class:`DataError` naming ``file:line``."""
    out = [parse_record(record, Path(path).parent, where) for record, where in iter_jsonl(path, "training data")]
    if not out:
        raise DataError(f"{path}: no records")
    return out


def render(processor: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """``messages`` through the processor's (or tokenizer's) own chat template, as text."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _n_images(messages: list[dict[str, Any]]) -> int:
    return sum(p["type"] == "image" for m in messages if isinstance(m["content"], list) for p in m["content"])


class SFTDataset(Sequence):
    """Tokenised examples for supervised fine-tuning, built on access with the model's processor and chat template.

    Item ``i`` is a dict of tensors: ``input_ids`` and ``labels`` (1-D, same length; ``labels`` is
    ``-100`` except on assistant tokens), and what the processor adds for images (``pixel_values``,
    ``image_grid_thw``, ``mm_token_type_ids`` for Qwen-VL). An assistant turn's trained tokens are found
    by rendering the conversation up to it with the generation prompt (its start) and up to its end
    (trailing whitespace after the end-of-turn token removed): both must be token prefixes of the whole.

    ``max_length`` truncates on the right (the end of the conversation is dropped); an example whose image
    tokens would be cut raises :class:`DataError`, since image features and placeholders must match.
    """

    def __init__(self, examples: Sequence[Example], processor: Any, max_length: int | None = None):
        self.examples = list(examples)
        self.processor = processor
        self.max_length = max_length
        tokenizer = getattr(processor, "tokenizer", processor)
        self.vision_ids = {i for i in (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None),
                                       getattr(tokenizer, "image_token_id", None)) if i is not None}

    def __len__(self) -> int:
        return len(self.examples)

    def _encode(self, text: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        kwargs = {"images": images} if images else {}
        return self.processor(text=[text], return_tensors="pt", **kwargs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ex = self.examples[index]
        images = [open_image(p, ex.where) for p in ex.images]
        full = render(self.processor, ex.messages, add_generation_prompt=False)
        enc = self._encode(full, images)
        ids = enc["input_ids"][0]
        labels = torch.full_like(ids, IGNORE)
        for turn, msg in enumerate(ex.messages):
            if msg["role"] != "assistant":
                continue
            head = render(self.processor, ex.messages[:turn], add_generation_prompt=True)
            upto = render(self.processor, ex.messages[:turn + 1], add_generation_prompt=False).rstrip()
            if not (full.startswith(upto) and upto.startswith(head)):
                raise DataError(f"{ex.where}: the chat template does not render assistant turn {turn} as a prefix "
                                "of the conversation, so its tokens cannot be located")
            start = self._encode(head, images[:_n_images(ex.messages[:turn])])["input_ids"][0]
            end = self._encode(upto, images[:_n_images(ex.messages[:turn + 1])])["input_ids"][0]
            if not (torch.equal(ids[:len(end)], end) and torch.equal(end[:len(start)], start)):
                raise DataError(f"{ex.where}: assistant turn {turn} does not tokenise the same alone as in the "
                                "conversation (a token spans the turn boundary)")
            labels[len(start):len(end)] = ids[len(start):len(end)]
        item = {"input_ids": ids, "labels": labels}
        item.update({k: v[0] if k in _TOKEN_KEYS else v for k, v in enc.items() if k not in ("input_ids", "attention_mask")})
        if self.max_length is not None and len(ids) > self.max_length:
            if any(int(t) in self.vision_ids for t in ids[self.max_length:]):
                raise DataError(f"{ex.where}: {len(ids)} tokens and max_length {self.max_length} would cut an image's "
                                "tokens; raise max_length or use smaller images")
            item.update({k: item[k][:self.max_length] for k in _TOKEN_KEYS if k in item})
        return item


def pad_id(processor: Any) -> int:
    """The id ``collate`` pads with: the tokenizer's pad token, else its end-of-sequence token."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the per-token tensors to the longest example (``input_ids`` with ``pad_id``, ``labels`` with
    -100, token types with 0), add ``attention_mask``, and concatenate per-image tensors in example order."""
    length = max(len(b["input_ids"]) for b in batch)
    fill = {"input_ids": pad_id, "labels": IGNORE}
    out: dict[str, torch.Tensor] = {}
    for key in _TOKEN_KEYS:
        having = [b[key] for b in batch if key in b]
        if having:
            out[key] = torch.full((len(batch), length), fill.get(key, 0), dtype=having[0].dtype)
    out["attention_mask"] = torch.zeros((len(batch), length), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        out["attention_mask"][i, :n] = 1
        for key in _TOKEN_KEYS:
            if key in out:
                out[key][i, :n] = b[key] if key in b else 0
    for key in dict.fromkeys(k for b in batch for k in b if k not in _TOKEN_KEYS):
        out[key] = torch.cat([b[key] for b in batch if key in b])
    return out


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
    from deltakit.evaluate import BenchItem, build_prompt

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
