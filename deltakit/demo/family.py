"""The miniature model family, built offline on a CPU and cached: base LM, reasoner, close and far MLLMs.

Every model is an ordinary Hugging Face checkpoint of a family deltakit supports (Qwen2 LLMs with the
tokenizer and chat template, Qwen2.5-VL MLLMs with the full processor), so every ``deltakit`` command runs
on them unchanged. The construction (fixed before any study result was seen; reasons in ``docs/study.md``):

1. **base** (Qwen2): random init, trained on the synthetic language (:func:`deltakit.demo.task.base_corpus`).
2. **reasoner** (Qwen2): the base trained further on the text chain of thought of the three-step task
   (:func:`deltakit.demo.task.text_cot`), like DeepSeek-R1-Distill-Qwen from Qwen2.5.
3. **close** (Qwen2.5-VL): the base's text tower (embeddings and head included) with a new vision encoder
   and merger, first aligned alone (:func:`align_vision`), then trained on transcription and one-step questions
   about images; the language tower lightly tuned (``close_tower_lr`` of the vision learning rate), like
   LLaVA / Idefics.
4. **far** (Qwen2.5-VL): the same start, trained ``far_steps`` on that data plus other multimodal tasks
   (:data:`deltakit.demo.task.FAR_KINDS`) with the language tower at the full learning rate, like Qwen-VL.

The training loop here is a plain AdamW loop (warmup then cosine, clipped gradients, loss on the
assistant's tokens); deltakit's own ``finetune`` is what the study measures, so it is not used to build
the family. The same recipe and seed give the same weights on the same machine and software (one process,
deterministic CPU kernels).

The family is cached in ``$XDG_CACHE_HOME/deltakit`` (or ``~/.cache/deltakit``) under a folder named by
:data:`RECIPE_VERSION` and a hash of the recipe; a complete folder (its ``family.json`` written last,
the folder renamed into place) is reused as is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from deltakit.demo.settings import FamilyRecipe
from deltakit.demo.task import (
    FAR_KINDS,
    base_corpus,
    perception,
    text_cot,
    vocabulary_corpus,
    write_task_data,
)
from deltakit.io.writer import atomic_output_dir
from deltakit.progress import ProgressFn, no_progress
from deltakit.tiny import SPECIAL, build_tiny, tiny_config
from deltakit.tiny_processor import build_tiny_processor

RECIPE_VERSION = 3
"""Bump when the construction changes in a way the recipe's fields do not show (the task, the loop, the data)."""
MEMBERS = ("base", "reasoner", "close", "far")
"""The family's models: folder names under the family folder."""
MLLMS = ("close", "far")
IGNORE = -100


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/deltakit``, else ``~/.cache/deltakit``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deltakit"


def recipe_key(recipe: FamilyRecipe) -> str:
    """The cache folder's name: the recipe version and a hash of the recipe's fields."""
    digest = hashlib.blake2b(json.dumps(asdict(recipe), sort_keys=True).encode(), digest_size=6).hexdigest()
    return f"minifamily-v{RECIPE_VERSION}-{digest}"


@dataclass(frozen=True)
class MiniFamily:
    """A built family: its folder, one model folder per member, and ``family.json`` (recipe, losses, accuracies)."""

    root: Path
    info: dict[str, Any]

    def path(self, member: str) -> Path:
        return self.root / member

    @property
    def reasoner(self) -> Path:
        return self.root / "reasoner"

    @property
    def base(self) -> Path:
        return self.root / "base"


def load_family(root: str | os.PathLike) -> MiniFamily:
    root = Path(root)
    return MiniFamily(root, json.loads((root / "family.json").read_text()))


def ensure_family(recipe: FamilyRecipe = FamilyRecipe(), cache: str | os.PathLike | None = None,
                  progress: ProgressFn = no_progress) -> tuple[MiniFamily, bool]:
    """The cached family of ``recipe`` (built first if absent) and whether it was built now."""
    root = Path(cache) if cache is not None else cache_root()
    folder = root / recipe_key(recipe)
    if (folder / "family.json").is_file():
        return load_family(folder), False
    root.mkdir(parents=True, exist_ok=True)
    return build_family(recipe, folder, progress=progress, force=folder.exists()), True


# -- building -----------------------------------------------------------------------------------------------

def _processor(recipe: FamilyRecipe) -> transformers.ProcessorMixin:
    """The family's processor: the tiny one, its tokenizer trained also on the language and pre-tokenized as Qwen2's
    (transformers loads a Qwen2 LLM folder's tokenizer as ``Qwen2Tokenizer``, which imposes that split; the LLMs
    and the MLLMs must tokenize alike, as built and as loaded)."""
    return build_tiny_processor("qwen2_5_vl", tuple(vocabulary_corpus()), qwen_split=True)


def _text_kw(recipe: FamilyRecipe) -> dict[str, Any]:
    return dict(hidden=recipe.hidden, layers=recipe.layers, heads=recipe.heads, kv_heads=recipe.kv_heads,
                intermediate=recipe.intermediate)


def mllm_config(recipe: FamilyRecipe) -> transformers.PretrainedConfig:
    """The Qwen2.5-VL config: :func:`deltakit.tiny.tiny_config`'s with the recipe's text and vision sizes."""
    config = tiny_config("qwen2_5_vl", **_text_kw(recipe))
    v = config.vision_config
    v.hidden_size, v.intermediate_size, v.num_heads, v.depth = (recipe.vision_hidden, 2 * recipe.vision_hidden,
                                                               recipe.vision_heads, recipe.vision_depth)
    v.fullatt_block_indexes = [recipe.vision_depth - 1]
    return config


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def train_loop(model: torch.nn.Module, groups: list[dict[str, Any]], batches: Iterator[Any],
               steps: int, progress: ProgressFn, desc: str,
               loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] = _model_loss) -> list[float]:
    """``steps`` AdamW steps (5% warmup, cosine to 0, gradients clipped to norm 1) on ``loss_fn(model, batch)``
    (default: the model's own loss of the batch's tensors); the loss of each step."""
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0)
    peak = [g["lr"] for g in opt.param_groups]
    warmup = max(1, steps // 20)
    losses: list[float] = []
    model.train()
    progress(0, total=steps, description=desc)
    for step in range(steps):
        factor = _schedule(step, steps, warmup)
        for g, lr in zip(opt.param_groups, peak):
            g["lr"] = lr * factor
        loss = loss_fn(model, next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress(1, info=f"loss {losses[-1]:.3f}")
    model.eval()
    return losses


def _label_chat(ids: list[int], header: list[int]) -> list[int]:
    """Labels of one rendered chat: the last assistant turn's tokens through its ``<|im_end|>``, -100 elsewhere."""
    start = max(i for i in range(len(ids)) if ids[i:i + len(header)] == header) + len(header)
    end = ids.index(SPECIAL["im_end"], start) + 1
    return [IGNORE] * start + ids[start:end] + [IGNORE] * (len(ids) - end)


def _pad(rows: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), SPECIAL["endoftext"])
    lab = torch.full((len(rows), n), IGNORE)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, :len(r)], lab[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(lb), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def text_batches(stream: Iterator[list[dict[str, str]]], processor: Any, batch: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a stream of text chats (the model's chat template; the assistant's answer trained)."""
    tok = processor.tokenizer
    header = tok("<|im_start|>assistant\n").input_ids
    while True:
        rows, labels = [], []
        for doc in itertools.islice(stream, batch):
            ids = tok(processor.apply_chat_template(doc, tokenize=False)).input_ids
            rows.append(ids)
            labels.append(_label_chat(ids, header))
        yield _pad(rows, labels)


def image_batches(stream: Iterator[tuple[Any, str, str]], processor: Any, batch: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``(image, question, answer)`` chats through the processor (the answer trained)."""
    header = processor.tokenizer("<|im_start|>assistant\n").input_ids
    while True:
        items = list(itertools.islice(stream, batch))
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}, {"role": "assistant", "content": a}],
            tokenize=False) for _, q, a in items]
        enc = processor(text=texts, images=[img for img, _, _ in items], padding=True, return_tensors="pt")
        labels = torch.full_like(enc["input_ids"], IGNORE)
        for i, row in enumerate(enc["input_ids"].tolist()):
            n = int(enc["attention_mask"][i].sum())
            labels[i, :n] = torch.tensor(_label_chat(row[:n], header))
        yield {**enc, "labels": labels}


def _save_llm(model: torch.nn.Module, processor: Any, path: Path) -> None:
    model.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(processor.chat_template)


def _tower_into(mllm: torch.nn.Module, llm: torch.nn.Module) -> None:
    """Copy a Qwen2 LLM's weights into a Qwen2.5-VL's text tower (embeddings and head included)."""
    state = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v
             for k, v in llm.state_dict().items()}
    missing, unexpected = mllm.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.visual.") for k in missing):
        raise RuntimeError(f"text tower copy: unexpected {unexpected[:3]}, missing {missing[:3]}")


def _accuracy(model_path: Path, data: Path, max_new_tokens: int) -> float:
    from deltakit.evaluate import evaluate

    return evaluate(model_path, data, batch_size=256, max_new_tokens=max_new_tokens).accuracy


def transcription_accuracy(model_path: Path, n: int, seed: int, max_new_tokens: int = 16) -> float:
    """Share of ``n`` held-out images whose four digits an MLLM transcribes exactly (greedy, "What are the numbers?")."""
    from deltakit.demo.task import draw_problem, render_digits

    processor = transformers.AutoProcessor.from_pretrained(model_path)
    processor.tokenizer.padding_side = "left"
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()
    rng = random.Random(f"transcribe:{seed}")
    problems = [draw_problem(rng, test=True) for _ in range(n)]
    images = [render_digits(p.digits, rng) for p in problems]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                             "text": "What are the numbers?"}]}], tokenize=False, add_generation_prompt=True)
    enc = processor(text=[prompt] * n, images=images, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.strip().startswith(p.listing) for t, p in zip(texts, problems)) / n


def align_vision(model: torch.nn.Module, recipe: FamilyRecipe, processor: Any, progress: ProgressFn = no_progress,
                 desc: str = "family: MLLM vision alignment") -> list[float]:
    """Stage 1 of an MLLM: train its vision encoder and merger alone so that the image token of each digit lies on
    the language tower's embedding of that digit (cross-entropy of cosine similarities to the ten digit embeddings,
    scale 20, plus their mean squared distance relative to the embeddings' mean square), ``align_steps`` steps of
    :func:`train_loop` at ``align_lr``; the analogue of LLaVA's projector pre-training. Returns the loss of each step."""
    from deltakit.demo.task import draw_problem, render_digits

    tok = processor.tokenizer
    digits = model.model.language_model.embed_tokens.weight.detach()[[tok.convert_tokens_to_ids(str(d)) for d in range(10)]]
    unit = digits / digits.norm(dim=-1, keepdim=True)
    scale = digits.pow(2).mean()

    def batches() -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        rng = random.Random(f"align:{recipe.seed}")
        while True:
            problems = [draw_problem(rng, test=False) for _ in range(recipe.batch)]
            enc = processor.image_processor(images=[render_digits(p.digits, rng) for p in problems], return_tensors="pt")
            yield enc, torch.tensor([p.digits for p in problems]).reshape(-1)  # one image token per digit, left to right

    def loss_fn(model: torch.nn.Module, batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        enc, target = batch
        feats = torch.cat(list(model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output))
        logits = feats / feats.norm(dim=-1, keepdim=True) @ unit.T * 20
        return (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.mse_loss(feats, digits[target]) / scale)

    return train_loop(model, [{"params": list(model.model.visual.parameters()), "lr": recipe.align_lr}], batches(),
                      recipe.align_steps, progress, desc, loss_fn)


def build_member(name: str, recipe: FamilyRecipe, partial: Path, processor: Any = None,
                 progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Train member ``name`` of ``recipe`` into ``partial/name`` (renamed into place when saved) unless it is there,
    and return its record (``partial/name.json``: losses, seconds). Needs the members it starts from (base)."""
    record = partial / f"{name}.json"
    if record.is_file():
        return json.loads(record.read_text())
    processor = processor if processor is not None else _processor(recipe)
    t0 = time.perf_counter()
    with atomic_output_dir(partial / name, overwrite=True) as dest:
        if name == "base":
            model = build_tiny("qwen2", seed=recipe.seed, **_text_kw(recipe)).float()
            stream: Any = base_corpus(random.Random(f"base:{recipe.seed}"))
            losses = train_loop(model, [{"params": list(model.parameters()), "lr": recipe.base_lr}],
                                text_batches(stream, processor, recipe.base_batch), recipe.base_steps, progress,
                                "family: base LM")
            _save_llm(model, processor, dest)
        elif name == "reasoner":
            model = transformers.Qwen2ForCausalLM.from_pretrained(partial / "base", dtype=torch.float32)
            stream = text_cot(random.Random(f"reasoner:{recipe.seed}"))
            losses = train_loop(model, [{"params": list(model.parameters()), "lr": recipe.reasoner_lr}],
                                text_batches(stream, processor, recipe.reasoner_batch), recipe.reasoner_steps, progress,
                                "family: reasoner")
            _save_llm(model, processor, dest)
        elif name in MLLMS:
            torch.manual_seed(recipe.seed + 1)  # the same vision init for both MLLMs
            model = transformers.Qwen2_5_VLForConditionalGeneration(mllm_config(recipe)).float()
            _tower_into(model, transformers.Qwen2ForCausalLM.from_pretrained(partial / "base", dtype=torch.float32))
            align = align_vision(model, recipe, processor, progress, f"family: {name} MLLM vision alignment")
            tower_lr = recipe.lr * (recipe.close_tower_lr if name == "close" else 1.0)
            vision = [p for n, p in model.named_parameters() if n.startswith("model.visual.")]
            text = [p for n, p in model.named_parameters() if not n.startswith("model.visual.")]
            stream = perception(random.Random(f"{name}:{recipe.seed}"), () if name == "close" else FAR_KINDS)
            steps = recipe.close_steps if name == "close" else recipe.far_steps
            losses = train_loop(model, [{"params": vision, "lr": recipe.lr}, {"params": text, "lr": tower_lr}],
                                image_batches(stream, processor, recipe.batch), steps, progress, f"family: {name} MLLM")
            losses = {"align": align, "train": losses}
            model.save_pretrained(dest)
            processor.save_pretrained(dest)
        else:
            raise ValueError(f"unknown family member {name!r}; members: {', '.join(MEMBERS)}")
    record.write_text(json.dumps({"losses": losses, "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
    return json.loads(record.read_text())


def build_family(recipe: FamilyRecipe, out: str | os.PathLike, progress: ProgressFn = no_progress,
                 force: bool = False) -> MiniFamily:
    """Build the four models of ``recipe`` into ``out``, which appears only when complete.

    Members are built one by one into ``<out>.partial/`` (:func:`build_member`), so an interrupted build resumes
    with the next member; each member depends only on the recipe and the base, so a resumed build (or members
    built in parallel processes) gives the same weights."""
    out = Path(out)
    started, cpu = time.perf_counter(), time.process_time()
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    processor = _processor(recipe)
    info: dict[str, Any] = {"recipe_version": RECIPE_VERSION, "recipe": asdict(recipe), "losses": {}, "seconds": {}}
    for name in MEMBERS:
        done = build_member(name, recipe, partial, processor, progress)
        info["losses"][name], info["seconds"][name] = done["losses"], done["seconds"]
    t0 = time.perf_counter()
    check = write_task_data(partial / "check", n_train=0, n_test=recipe.n_check, n_heldout=0, seed=recipe.seed)
    info["text_accuracy"] = {m: _accuracy(partial / m, check.text_test, recipe.max_new_tokens) for m in ("base", "reasoner")}
    info["transcription_accuracy"] = {m: transcription_accuracy(partial / m, recipe.n_check, recipe.seed) for m in MLLMS}
    info["seconds"]["check"] = round(time.perf_counter() - t0, 1)
    info["parameters"] = {"llm": sum(math.prod(s) for s in _shapes(partial / "base")),
                          "mllm": sum(math.prod(s) for s in _shapes(partial / "close"))}
    info["seconds"]["this_run"] = round(time.perf_counter() - started, 1)
    info["cpu_seconds_this_run"] = round(time.process_time() - cpu, 1)
    (partial / "family.json").write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists")
        shutil.rmtree(out)
    partial.rename(out)
    return load_family(out)


def _shapes(folder: Path) -> list[tuple[int, ...]]:
    from safetensors import safe_open

    out = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out += [tuple(fh.get_slice(k).get_shape()) for k in fh.keys()]  # noqa: SIM118 (safe_open is not iterable)
    return out
