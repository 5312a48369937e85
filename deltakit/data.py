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

import bisect
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from deltakit.errors import DeltakitError
from deltakit.train.config import CUTOFF_POLICIES

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


def render(processor: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, **template_kwargs: Any) -> str:
    """``messages`` through the processor's (or tokenizer's) own chat template, as text; ``template_kwargs`` go to the
    template (e.g. ``enable_thinking=False`` for Qwen3)."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs)


def _n_images(messages: list[dict[str, Any]]) -> int:
    return sum(p["type"] == "image" for m in messages if isinstance(m["content"], list) for p in m["content"])


@dataclass(frozen=True)
class Encoded:
    """One example after the processor: ``item`` (None when dropped), ``status`` (``kept``, ``truncated``,
    ``dropped_long``, ``dropped_prompt``, ``dropped_image``), the tokens and trained tokens the cutoff removed,
    and for a dropped example the reason as one line."""

    item: dict[str, torch.Tensor] | None
    status: str
    tokens_cut: int = 0
    targets_cut: int = 0
    reason: str = ""


def _token_index(starts: list[int], ends: list[int], char: int, where: str, turn: int) -> int:
    """How many tokens of the unexpanded text lie before character ``char``; a token across it is an error."""
    k = bisect.bisect_left(starts, char)
    if k and ends[k - 1] > char:
        raise DataError(f"{where}: assistant turn {turn} does not tokenise the same alone as in the conversation "
                        "(a token spans the turn boundary)")
    return k


class SFTDataset(Sequence):
    """Tokenised examples for supervised fine-tuning, built on access with the model's processor and chat template.

    Item ``i`` is a dict of tensors: ``input_ids`` and ``labels`` (1-D, same length; ``labels`` is
    ``-100`` except on assistant tokens), and what the processor adds for images (``pixel_values``,
    ``image_grid_thw``, ``mm_token_type_ids`` for Qwen-VL). The processor runs once per example: an
    assistant turn's characters are located in the rendered conversation (it starts where the conversation
    up to it, rendered with the generation prompt, ends, and ends where the conversation up to its end ends,
    trailing whitespace removed; both must be text prefixes of the whole), and mapped to tokens with the
    tokenizer's character offsets; each image placeholder stands for the run of image tokens the processor
    expanded it to. A processor that expands images otherwise is handled by encoding the two prefixes too.

    ``max_length`` (``--cutoff-len``) with ``cutoff_policy`` ``truncate`` cuts inside an answer, or drops whole
    turns after the last answer that fits; an example whose prompt or image tokens would be cut cannot be
    used (:meth:`encode` says so, indexing raises :class:`DataError`). ``drop`` refuses every longer example.
    ``template_kwargs`` go to the chat template (``enable_thinking`` for Qwen3).
    """

    def __init__(self, examples: Sequence[Example], processor: Any, max_length: int | None = None,
                 cutoff_policy: str = "truncate", template_kwargs: dict[str, Any] | None = None):
        if cutoff_policy not in CUTOFF_POLICIES:
            raise ValueError(f"cutoff_policy must be one of {', '.join(CUTOFF_POLICIES)}, not {cutoff_policy!r}")
        self.examples = list(examples)
        self.processor = processor
        self.max_length = max_length
        self.cutoff_policy = cutoff_policy
        self.template_kwargs = dict(template_kwargs or {})
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.vision_ids = {i for i in (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None),
                                       getattr(self.tokenizer, "image_token_id", None)) if i is not None}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        encoded = self.encode(index)
        if encoded.item is None:
            raise DataError(encoded.reason)
        return encoded.item

    def _encode(self, text: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        kwargs = {"images": images} if images else {}
        return self.processor(text=[text], return_tensors="pt", **kwargs)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return render(self.processor, messages, add_generation_prompt, **self.template_kwargs)

    def _assistant_turns(self, ex: Example) -> Iterator[tuple[int, dict[str, Any], str, str]]:
        """``(turn, message, head, upto)`` per assistant turn: the conversation rendered up to the turn's start (with
        the generation prompt) and through its end."""
        for turn, msg in enumerate(ex.messages):
            if msg["role"] == "assistant":
                yield (turn, msg, self._render(ex.messages[:turn], add_generation_prompt=True),
                       self._render(ex.messages[:turn + 1], add_generation_prompt=False).rstrip())

    def _char_spans(self, ex: Example) -> tuple[str, list[tuple[int, int, int]]]:
        """The rendered conversation and ``(turn, start, end)`` character spans of its assistant turns."""
        full = self._render(ex.messages, add_generation_prompt=False)
        spans = []
        for turn, msg, head, upto in self._assistant_turns(ex):
            if not (full.startswith(upto) and upto.startswith(head)):
                hint = ""
                if self.template_kwargs.get("enable_thinking") is False and "<think>" in str(msg["content"]):
                    hint = " (the answer has <think> reasoning but enable_thinking is off; turn it on or remove the reasoning)"
                elif upto.startswith(head):
                    hint = " (the template renders earlier turns differently, e.g. Qwen3 drops their reasoning: " \
                           "give one example per assistant turn)"
                raise DataError(f"{ex.where}: the chat template does not render assistant turn {turn} as a prefix "
                                f"of the conversation, so its tokens cannot be located{hint}")
            spans.append((turn, len(head), len(upto)))
        return full, spans

    def _token_spans(self, ids: torch.Tensor, full: str, spans: list[tuple[int, int, int]], where: str) -> list[tuple[int, int]] | None:
        """Token spans of the character spans from the tokenizer's offsets of ``full``; None when the processor's
        image expansion is not a run of the placeholder token (then :meth:`_encoded_spans` is used)."""
        plain = self.tokenizer(full, return_offsets_mapping=True)
        unexpanded, offsets = plain["input_ids"], plain["offset_mapping"]
        runs: list[int] = []  # collapse each run of one vision token to a single placeholder
        collapsed: list[int] = []
        for t in ids.tolist():
            if t in self.vision_ids and collapsed and collapsed[-1] == t and runs[-1] > 0:
                runs[-1] += 1
                continue
            collapsed.append(t)
            runs.append(1 if t in self.vision_ids else 0)
        if collapsed != list(unexpanded):
            return None
        extra = [0]
        for r in runs:
            extra.append(extra[-1] + max(r - 1, 0))
        starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
        out = []
        for turn, s, e in spans:
            a, b = _token_index(starts, ends, s, where, turn), _token_index(starts, ends, e, where, turn)
            out.append((a + extra[a], b + extra[b]))
        return out

    def _encoded_spans(self, ids: torch.Tensor, ex: Example, images: list[Image.Image]) -> list[tuple[int, int]]:
        """Token spans by encoding the conversation up to each turn's start and end with their images (any processor)."""
        out = []
        for turn, _, head, upto in self._assistant_turns(ex):
            start = self._encode(head, images[:_n_images(ex.messages[:turn])])["input_ids"][0]
            end = self._encode(upto, images[:_n_images(ex.messages[:turn + 1])])["input_ids"][0]
            if not (torch.equal(ids[:len(end)], end) and torch.equal(end[:len(start)], start)):
                raise DataError(f"{ex.where}: assistant turn {turn} does not tokenise the same alone as in the "
                                "conversation (a token spans the turn boundary)")
            out.append((len(start), len(end)))
        return out

    def encode(self, index: int) -> Encoded:
        """Example ``index`` through the processor, with its labels and the cutoff policy applied."""
        ex = self.examples[index]
        images = [open_image(p, ex.where) for p in ex.images]
        full, char_spans = self._char_spans(ex)
        enc = self._encode(full, images)
        ids = enc["input_ids"][0]
        spans = self._token_spans(ids, full, char_spans, ex.where)
        if spans is None:
            spans = self._encoded_spans(ids, ex, images)
        labels = torch.full_like(ids, IGNORE)
        for a, b in spans:
            labels[a:b] = ids[a:b]
        item = {"input_ids": ids, "labels": labels}
        item.update({k: v[0] if k in _TOKEN_KEYS else v for k, v in enc.items() if k not in ("input_ids", "attention_mask")})
        return self._cut(item, spans, ex.where)

    def _cut(self, item: dict[str, torch.Tensor], spans: list[tuple[int, int]], where: str) -> Encoded:
        """Apply ``max_length`` and the cutoff policy (``docs/data.md``, "Cutoff")."""
        ids, limit = item["input_ids"], self.max_length
        if limit is None or len(ids) <= limit:
            return Encoded(item, "kept")
        n = len(ids)
        if self.cutoff_policy == "drop":
            return Encoded(None, "dropped_long", n, int((item["labels"] != IGNORE).sum()),
                           f"{where}: {n} tokens, longer than the cutoff {limit} (cutoff policy drop)")
        inside = any(a < limit < b for a, b in spans)
        cut = limit if inside else max((b for a, b in spans if b <= limit), default=0)
        targets = int((item["labels"] != IGNORE).sum())
        if cut == 0:
            return Encoded(None, "dropped_prompt", n, targets,
                           f"{where}: {n} tokens and cutoff {limit} would cut the prompt before the first answer; raise the cutoff")
        if any(int(t) in self.vision_ids for t in ids[cut:]):
            return Encoded(None, "dropped_image", n, targets,
                           f"{where}: {n} tokens and cutoff {limit} would cut an image's tokens; raise the cutoff or use smaller images")
        item.update({k: item[k][:cut] for k in _TOKEN_KEYS if k in item})
        return Encoded(item, "truncated", n - cut, targets - int((item["labels"] != IGNORE).sum()))


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
