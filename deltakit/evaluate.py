"""``deltakit eval``: greedy generation on a MathVista-style benchmark and answer scoring (see ``docs/eval.md``).

Any checkpoint transformers can load works (a base MLLM, a ``deltakit merge`` or ``deltakit finetune``
output): the class comes from ``config.json`` ``architectures`` (never remote code), the prompt from the
model's own processor and chat template, and batches are left-padded so each row's generation starts
right after its own prompt. With ``predictions_path`` every prediction is also written to a JSONL file (one
line each, flushed) as soon as it is scored, so an interrupted run keeps the predictions it made.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from deltakit.answers import ANSWER_TYPES, score
from deltakit.data import DataError, iter_jsonl, open_image, render, resolve_image
from deltakit.errors import DeltakitError
from deltakit.hf import load_processor, model_class
from deltakit.progress import ProgressFn, no_progress

_HINTS = {
    "multi_choice": "Answer with the option's letter from the given choices.",
    "integer": "Answer with an integer.",
    "text": "Answer with a word or a short phrase.",
}
INSTRUCTION = "Think step by step inside <think> </think>, then give the final answer in \\boxed{}."


@dataclass(frozen=True)
class BenchItem:
    """One benchmark question (a MathVista-style JSONL record)."""

    id: str
    question: str
    answer: str
    answer_type: str
    category: str
    image: Path | None = None
    choices: list[str] | None = None
    precision: int | None = None
    query: str | None = None
    where: str = ""

    @classmethod
    def from_record(cls, rec: Any, base: Path, where: str) -> "BenchItem":
        """Validate a record; ``image`` is relative to ``base``. ``answer_type`` may be left out when ``choices``
        are given (then ``multi_choice``); MathVista's ``question_type: multi_choice``, ``metadata.category``
        and float ``precision`` are understood."""
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a record must be a JSON object")
        for key in ("question", "answer"):
            if not isinstance(rec.get(key), (str, int, float)) or isinstance(rec.get(key), bool):
                raise DataError(f"{where}: missing or non-text {key!r}")
        choices = rec.get("choices")
        if choices is not None and (not isinstance(choices, list) or not choices):
            raise DataError(f"{where}: 'choices' must be a non-empty list")
        kind = "multi_choice" if rec.get("question_type") == "multi_choice" else rec.get("answer_type")
        kind = kind or ("multi_choice" if choices else None)
        if kind not in ANSWER_TYPES:
            raise DataError(f"{where}: answer_type {kind!r} is not one of {', '.join(ANSWER_TYPES)}")
        if kind == "multi_choice" and not choices:
            raise DataError(f"{where}: a multi_choice question needs 'choices'")
        letters = [chr(65 + i) for i in range(len(choices or []))]
        if kind == "multi_choice" and str(rec["answer"]) not in [str(c) for c in choices] + letters:
            raise DataError(f"{where}: answer {rec['answer']!r} is neither one of the choices nor an option letter")
        precision = rec.get("precision")
        if precision is not None and (not isinstance(precision, (int, float)) or not 0 <= precision < float("inf")):
            raise DataError(f"{where}: 'precision' must be a non-negative number of decimal places")
        if rec.get("query") is not None and not isinstance(rec["query"], str):
            raise DataError(f"{where}: 'query' must be a string (the whole prompt)")
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        category = rec.get("category") or meta.get("category") or meta.get("task") or "uncategorized"
        image = resolve_image(rec["image"], base, where) if rec.get("image") else None
        return cls(id=str(rec.get("id", rec.get("pid", where.rsplit(":", 1)[-1]))), question=str(rec["question"]),
                   answer=str(rec["answer"]), answer_type=kind, category=str(category), image=image,
                   choices=[str(c) for c in choices] if choices else None,
                   precision=int(precision) if precision is not None else None, query=rec.get("query"), where=where)


def load_bench(path: str | os.PathLike, limit: int | None = None) -> list[BenchItem]:
    """The first ``limit`` (all when None) questions of a benchmark JSONL."""
    items = []
    for rec, where in iter_jsonl(path, "benchmark file"):
        if limit is not None and len(items) >= limit:
            break
        items.append(BenchItem.from_record(rec, Path(path).parent, where))
    if not items:
        raise DataError(f"{path}: no questions")
    return items


def build_prompt(item: BenchItem) -> str:
    """The user prompt: the record's ``query`` when given, else the question, lettered choices, an answer-format
    hint (for floats the number of decimal places) and the think-then-box instruction."""
    if item.query:
        return item.query
    lines = [item.question]
    if item.choices:
        lines += ["Choices:", *(f"({chr(65 + i)}) {c}" for i, c in enumerate(item.choices))]
    if item.answer_type == "float":
        places = item.precision if item.precision is not None else 2
        lines.append(f"Answer with a number with {places} decimal place{'s' if places != 1 else ''}.")
    else:
        lines.append(_HINTS[item.answer_type])
    lines.append(INSTRUCTION)
    return "\n".join(lines)


@dataclass
class EvalReport:
    """Accuracy overall, per category and per answer type, and every prediction."""

    model: str
    data: str
    examples: int
    correct: int
    accuracy: float
    unanswered: int
    categories: dict[str, dict[str, float]]
    answer_types: dict[str, dict[str, float]]
    batch_size: int
    max_new_tokens: int
    device: str
    dtype: str
    seconds: float
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_for_generation(model_path: str | os.PathLike, device: str | None = None) -> tuple[Any, Any]:
    """The model (class from ``config.json`` ``architectures``; bf16 on a GPU that has it, else float32) and its processor."""
    path = Path(model_path)
    cls = model_class(path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    processor = load_processor(path, "to generate answers")
    model = cls.from_pretrained(path, dtype=dtype).to(dev).eval()
    return model, processor


def generate(model: Any, processor: Any, items: list[BenchItem], max_new_tokens: int) -> list[str]:
    """Greedy completions of ``items`` as one left-padded batch, decoded without special tokens."""
    tokenizer = getattr(processor, "tokenizer", processor)
    has_vision = hasattr(processor, "image_processor")
    texts, images = [], []
    for item in items:
        if item.image is not None and not has_vision:
            raise DeltakitError(f"{item.where}: the question has an image but the model has no image processor")
        content: Any = build_prompt(item)
        if item.image is not None:
            content = [{"type": "image"}, {"type": "text", "text": content}]
            images.append(open_image(item.image, item.where))
        texts.append(render(processor, [{"role": "user", "content": content}], add_generation_prompt=True))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    kwargs = {"images": images} if images else {}
    enc = processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(model.device)
    gen = copy.deepcopy(model.generation_config)
    gen.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens,
               pad_token_id=tokenizer.pad_token_id, use_cache=True)  # fine-tuned configs may say use_cache: false
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=gen)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _accuracy(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[bool]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row["correct"])
    return {k: {"examples": len(v), "correct": sum(v), "accuracy": sum(v) / len(v)} for k, v in sorted(groups.items())}


def _open_predictions(path: str | os.PathLike | None) -> contextlib.AbstractContextManager[IO[str] | None]:
    """``path`` opened for writing (replacing what it held), or a context giving None when no path is given."""
    if path is None:
        return contextlib.nullcontext()
    try:
        return open(path, "w", encoding="utf-8")  # closed by the caller's ``with``
    except OSError as exc:
        raise DeltakitError(f"{path}: cannot write predictions ({exc.strerror})") from None


def evaluate(model_path: str | os.PathLike, data_path: str | os.PathLike, batch_size: int = 8, max_new_tokens: int = 512,
             progress: ProgressFn = no_progress, limit: int | None = None, device: str | None = None,
             predictions_path: str | os.PathLike | None = None) -> EvalReport:
    """Generate greedily for every question of ``data_path`` with the model at ``model_path`` and score the answers.

    ``predictions_path``: a JSONL file that gets each prediction (the same record as in
    :attr:`EvalReport.predictions`) as one line, written and flushed as soon as it is scored."""
    if batch_size < 1 or max_new_tokens < 1:
        raise DeltakitError(f"--batch-size and --max-new-tokens must be at least 1 (got {batch_size}, {max_new_tokens})")
    items = load_bench(data_path, limit)
    started = time.perf_counter()
    with _open_predictions(predictions_path) as sink:
        model, processor = load_for_generation(model_path, device)
        progress(0, total=len(items), description="generating")
        rows: list[dict[str, Any]] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            for item, output in zip(chunk, generate(model, processor, chunk, max_new_tokens)):
                prediction, correct = score(output, item.answer, item.answer_type, item.choices, item.precision)
                row = {"id": item.id, "category": item.category, "answer_type": item.answer_type,
                       "question": item.question, "choices": item.choices, "answer": item.answer,
                       "output": output, "prediction": prediction, "correct": correct}
                rows.append(row)
                if sink is not None:
                    _write_line(sink, row, predictions_path)
            progress(len(chunk), info=f"accuracy {sum(r['correct'] for r in rows) / len(rows):.1%}")
    correct = sum(r["correct"] for r in rows)
    return EvalReport(model=str(model_path), data=str(data_path), examples=len(rows), correct=correct,
                      accuracy=correct / len(rows), unanswered=sum(r["prediction"] is None for r in rows),
                      categories=_accuracy(rows, "category"), answer_types=_accuracy(rows, "answer_type"),
                      batch_size=batch_size, max_new_tokens=max_new_tokens, device=str(model.device),
                      dtype=str(model.dtype).removeprefix("torch."), seconds=time.perf_counter() - started,
                      predictions=rows)


def _write_line(sink: IO[str], row: dict[str, Any], path: str | os.PathLike | None) -> None:
    try:
        sink.write(json.dumps(row) + "\n")
        sink.flush()
    except OSError as exc:
        raise DeltakitError(f"{path}: cannot write predictions ({exc.strerror})") from None


from deltakit._callable import make_callable  # noqa: E402

make_callable(__name__)  # deltakit.evaluate(model, data) is deltakit.evaluate.evaluate(model, data)
