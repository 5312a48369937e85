"""``deltakit eval``: generate an answer to every question of a benchmark with a model, then score them with the
benchmark's official rules (:mod:`deltakit.benchmarks`; see ``docs/eval.md`` and ``docs/scoring.md``).

Any checkpoint transformers can load works (a base MLLM, a ``deltakit merge`` or ``deltakit finetune``
output, or a hub ID): the class comes from ``config.json`` ``architectures`` (never remote code), the prompt
from the benchmark (or ``prompt``) through the model's own processor and chat template, and batches are
left-padded so each row's generation starts right after its own prompt. Every prediction is appended to
``predictions_path`` (one JSON line, flushed) as soon as it is made, and ``resume`` continues from such a
file, so an interrupted run loses nothing it finished.
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

from deltakit.benchmarks.core import Item, ScoreReport, load, render_prompt, report, score_one
from deltakit.benchmarks.native import BenchItem, build_prompt, load_bench  # noqa: F401 - the JSONL format's API, kept here
from deltakit.data import DataError
from deltakit.errors import DeltakitError
from deltakit.hf import load_processor, model_class
from deltakit.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: greedy at ``temperature`` 0 (the default), else sampling with ``top_p``, seeded per batch."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise DeltakitError(f"--temperature must be >= 0 and --top-p in (0, 1] (got {self.temperature}, {self.top_p})")


@dataclass
class EvalReport(ScoreReport):
    """A :class:`~deltakit.benchmarks.ScoreReport` plus how the predictions were generated."""

    model: str = ""
    batch_size: int = 0
    max_new_tokens: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    dtype: str = ""
    seconds: float = 0.0
    resumed: int = 0


def load_for_generation(model_path: str | os.PathLike, device: str | None = None, revision: str | None = None) -> tuple[Any, Any]:
    """The model (class from ``config.json`` ``architectures``; bf16 on a GPU that has it, else float32) and its processor."""
    from deltakit.hub import resolve_model

    path = resolve_model(model_path, revision)
    cls = model_class(path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    processor = load_processor(path, "to generate answers")
    model = cls.from_pretrained(path, dtype=dtype).to(dev).eval()
    return model, processor


def generate(model: Any, processor: Any, items: list[Item], max_new_tokens: int, prompt: str | None = None,
             sampling: Sampling = Sampling(), chat_template_kwargs: dict[str, Any] | None = None) -> list[str]:
    """Completions of ``items`` as one left-padded batch (greedy unless ``sampling.temperature`` > 0), decoded without
    special tokens. ``prompt`` overrides the benchmark's prompt (a template of the record's fields);
    ``chat_template_kwargs`` go to the chat template (e.g. ``{"enable_thinking": False}``)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    has_vision = hasattr(processor, "image_processor")
    texts, images = [], []
    for item in items:
        if item.images and not has_vision:
            raise DeltakitError(f"{item.where}: the question has an image but the model has no image processor")
        content: Any = render_prompt(item, prompt)
        if item.images:
            content = [*({"type": "image"} for _ in item.images), {"type": "text", "text": content}]
            images += [im.open(item.where) for im in item.images]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                   add_generation_prompt=True, **(chat_template_kwargs or {})))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    kwargs = {"images": images} if images else {}
    enc = processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(model.device)
    gen = copy.deepcopy(model.generation_config)
    if sampling.temperature > 0:
        gen.update(do_sample=True, num_beams=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
    else:
        gen.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
    gen.update(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True)  # fine-tuned configs may say use_cache: false
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=gen)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def read_done(path: Path, items: list[Item]) -> dict[str, dict[str, Any]]:
    """The predictions an earlier run of the same eval wrote to ``path`` (id -> record), for ``resume``.

    A last line cut by the interruption is dropped (the file is truncated to the last whole line); a record
    for an id the benchmark does not have is an error (a different benchmark's file)."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        with path.open("r+b") as fh:
            fh.truncate(len(keep))
    ids = {it.id for it in items}
    done: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(keep.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key = str(rec["id"])
            rec["prediction"]  # noqa: B018
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: not a prediction line of deltakit eval; cannot --resume from it") from None
        if key not in ids:
            raise DataError(f"{path}:{n}: id {key!r} is not in this benchmark (or outside --limit); cannot --resume from it")
        done[key] = rec
    return done


def evaluate(model_path: str | os.PathLike, data_path: str | os.PathLike, batch_size: int = 8, max_new_tokens: int = 512,
             progress: ProgressFn = no_progress, limit: int | None = None, device: str | None = None,
             predictions_path: str | os.PathLike | None = None, format: str | None = None, revision: str | None = None,
             resume: bool = False, prompt: str | None = None, sampling: Sampling = Sampling(),
             chat_template_kwargs: dict[str, Any] | None = None, lenient: bool = False) -> EvalReport:
    """Generate an answer to every question of ``data_path`` (any benchmark file :func:`deltakit.benchmarks.load`
    reads; ``format`` names the benchmark when detection cannot) and score them with its official rules.

    ``predictions_path``: a JSONL file that gets each scored prediction (the record of
    :attr:`EvalReport.predictions`) as one line as soon as it is made; replaced at the start, or with ``resume``
    continued: questions it already answers are not generated again."""
    if batch_size < 1 or max_new_tokens < 1:
        raise DeltakitError(f"--batch-size and --max-new-tokens must be at least 1 (got {batch_size}, {max_new_tokens})")
    if limit is not None and limit < 1:
        raise DeltakitError(f"--limit must be at least 1 (got {limit})")
    if resume and predictions_path is None:
        raise DeltakitError("--resume needs the predictions file of the interrupted run (--predictions, or --json OUT.json)")
    sampling.check()
    bench, items = load(data_path, format, limit)
    if prompt is not None:
        render_prompt(items[0], prompt)  # a bad template fails before the model loads
    pred_path = Path(predictions_path) if predictions_path is not None else None
    done = read_done(pred_path, items) if resume and pred_path is not None else {}
    todo = [it for it in items if it.id not in done]
    started = time.perf_counter()
    by_id = {it.id: it for it in items}
    position = {it.id: i for i, it in enumerate(items)}
    rows: dict[str, dict[str, Any]] = {k: score_one(bench, by_id[k], v["prediction"], lenient) for k, v in done.items()}
    model = None
    with _open_predictions(pred_path, append=resume) as sink:
        if todo:
            model, processor = load_for_generation(model_path, device, revision)
        progress(0, total=len(todo), description="generating")
        t0, n_done = time.perf_counter(), 0
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            if sampling.temperature > 0:
                torch.manual_seed(sampling.seed + position[chunk[0].id])
            outputs = generate(model, processor, chunk, max_new_tokens, prompt, sampling, chat_template_kwargs)
            for item, output in zip(chunk, outputs):
                row = score_one(bench, item, output, lenient)
                rows[item.id] = row
                if sink is not None:
                    _write_line(sink, row, pred_path)
            n_done += len(chunk)
            acc = sum(r["correct"] for r in rows.values()) / len(rows)
            progress(len(chunk), info=f"accuracy {acc:.1%} · {n_done / (time.perf_counter() - t0):.2f} items/s")
    ordered = [rows[it.id] for it in items]
    base = report(bench, items, ordered, str(data_path))
    return EvalReport(**base.to_dict() | {"predictions": ordered}, model=str(model_path), batch_size=batch_size,
                      max_new_tokens=max_new_tokens, sampling=asdict(sampling),
                      chat_template_kwargs=dict(chat_template_kwargs or {}),
                      device=str(model.device) if model is not None else "",
                      dtype=str(model.dtype).removeprefix("torch.") if model is not None else "",
                      seconds=time.perf_counter() - started, resumed=len(done))


def _open_predictions(path: Path | None, append: bool) -> contextlib.AbstractContextManager[IO[str] | None]:
    """``path`` opened for writing (appending with ``append``), or a context giving None when no path is given."""
    if path is None:
        return contextlib.nullcontext()
    try:
        return open(path, "a" if append else "w", encoding="utf-8")  # closed by the caller's ``with``
    except OSError as exc:
        raise DeltakitError(f"{path}: cannot write predictions ({exc.strerror})") from None


def _write_line(sink: IO[str], row: dict[str, Any], path: Path | None) -> None:
    try:
        sink.write(json.dumps(row) + "\n")
        sink.flush()
    except OSError as exc:
        raise DeltakitError(f"{path}: cannot write predictions ({exc.strerror})") from None


from deltakit._callable import make_callable  # noqa: E402

make_callable(__name__)  # deltakit.evaluate(model, data) is deltakit.evaluate.evaluate(model, data)
