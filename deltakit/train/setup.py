"""What a run needs around the loop: the model (loaded, frozen by role), the data, the schedule, the final save."""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltakit.datacache import CacheRequest
from deltakit.drift import PriorSource
from deltakit.errors import DeltakitError
from deltakit.hf import load_processor, model_class
from deltakit.model import map_parameters, open_model
from deltakit.train.config import TrainConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(config: TrainConfig) -> tuple[torch.nn.Module, str]:
    """Load the MLLM (class from its ``config.json`` ``architectures``) in float32 master weights and freeze roles.

    Returns the model and its family name. Parameters whose role (``vision``, ``projector``, ``text``,
    ``other``; from the family table) is in ``config.freeze`` get ``requires_grad = False``.
    """
    mapped = open_model(config.model, config.family)
    model = model_class(mapped.path).from_pretrained(mapped.path, dtype=torch.float32)  # mapped.path: a hub ID resolved
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _, infos, _ = map_parameters(model, mapped.family)
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        frozen = infos[name].role in config.freeze
        p.requires_grad_(not frozen)
        counts["frozen" if frozen else "trainable"] += p.numel()
    if not counts["trainable"]:
        raise DeltakitError(f"--freeze {','.join(config.freeze)} leaves nothing to train")
    log.info("%s (%s): %s trainable parameters, %s frozen (%s)", config.model, mapped.family.name,
             f"{counts['trainable']:,}", f"{counts['frozen']:,}", ", ".join(config.freeze) or "nothing frozen")
    return model, mapped.family.name


def add_lora(model: torch.nn.Module, family: str, config: TrainConfig) -> torch.nn.Module:
    """Wrap the loaded model with PEFT LoRA adapters (``config.lora_rank`` > 0); returns the ``PeftModel``.

    Targets: the text-tower linear layers of ``config.lora_targets`` (module kinds; default attention and MLP,
    :func:`deltakit.lora.target_modules`); every base weight is frozen.
    """
    from deltakit.lora import add_lora as wrap

    return wrap(model, family, config.lora_rank, config.resolved_lora_alpha, config.lora_targets)


MERGED = "merged"
"""The subfolder of a LoRA run's output that holds the merged model (``merge_lora``)."""
_MODEL_FILES = ("config.json", "generation_config.json")


def save_lora(model: torch.nn.Module, config: TrainConfig, folder: Path, dtype: torch.dtype, extra_files: dict[str, str]) -> None:
    """Save a LoRA run: the PEFT adapter in ``folder``, and with ``merge_lora`` the merged model in ``folder/merged``.

    ``folder`` gets ``adapter_model.safetensors`` (float32, as trained) and ``adapter_config.json``
    (``PeftModel.from_pretrained(base, folder)`` loads it), the base model's processor and tokenizer files and
    ``extra_files``. The merged model (``W + s B A``, then ``dtype``) is saved like a full fine-tuning output, in
    its own subfolder: transformers would read a model folder holding ``adapter_config.json`` as an adapter.
    """
    model.save_pretrained(folder, safe_serialization=True)
    for path in open_model(config.model, config.family).ckpt.non_weight_files():
        if path.name not in _MODEL_FILES and not (folder / path.name).exists():
            shutil.copy2(path, folder / path.name)
    for name, text in extra_files.items():
        (folder / name).write_text(text)
    if config.merge_lora:
        merged = model.merge_and_unload()
        save_final(merged, merged.state_dict(), config, folder / MERGED, dtype, {})


def save_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype of the saved weights: ``config.save_dtype``, or for ``auto`` the base checkpoint's text-tower dtype."""
    if config.save_dtype != "auto":
        return _DTYPES[config.save_dtype]
    mapped = open_model(config.model, config.family)
    return mapped.ckpt.meta(next(iter(mapped.text.values())).key).dtype


def load_data(config: TrainConfig) -> tuple[Sequence[dict] | CacheRequest, Callable[[list[dict]], dict], Any]:
    """The training examples (a :class:`~deltakit.datacache.CacheRequest`, opened by the loop: processed once
    into the data cache; the loop sets the precision and model type that resolve ``cache_pixels`` auto), the
    collate function (:func:`~deltakit.train.loader.pack` with ``packing``) and the model's processor."""
    from deltakit.data import collate, pad_id
    from deltakit.train.loader import pack

    processor = load_processor(config.model, "to build training inputs")
    request = CacheRequest(config.data, processor, max_length=config.cutoff_len, cutoff_policy=config.cutoff_policy,
                           template_kwargs=config.template_kwargs, cache_dir=config.cache_dir, workers=config.num_workers,
                           pixels=config.cache_pixels)
    return request, functools.partial(pack if config.packing else collate, pad_id=pad_id(processor)), processor


def open_prior(path: str) -> PriorSource:
    """The DRIFT prior at ``path`` (a folder or file written by ``deltakit prior``)."""
    from deltakit.prior import Prior

    return Prior.open(path)


@dataclass(frozen=True)
class Plan:
    """How examples become optimizer steps: global batch, steps per epoch, total and warmup steps."""

    examples: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def make(cls, examples: int, config: TrainConfig, world_size: int) -> "Plan":
        """Steps of ``batch_size * grad_accum * world_size`` examples; an incomplete last batch of an epoch is dropped."""
        batch = config.batch_size * config.grad_accum * world_size
        per_epoch = examples // batch
        if per_epoch == 0:
            raise DeltakitError(f"{config.data}: {examples} examples, fewer than one global batch of {batch} "
                                f"(batch_size {config.batch_size} x grad_accum {config.grad_accum} x {world_size} processes)")
        total = config.max_steps or config.epochs * per_epoch
        return cls(examples, batch, per_epoch, total, math.ceil(config.warmup_ratio * total))

    def lr_factor(self, step: int) -> float:
        """Linear warmup then cosine decay, as a factor of the peak lr for 0-based ``step``.

        Warmup steps ``s < w`` get ``(s + 1) / w`` (the first step already learns); after it,
        ``0.5 * (1 + cos(pi * (s - w) / (T - w)))``, so the last step's factor is small but non-zero.
        """
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def save_final(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], config: TrainConfig, folder: Path,
               dtype: torch.dtype, extra_files: dict[str, str]) -> None:
    """Save in the MLLM's own format (``save_pretrained``, safetensors) plus processor/tokenizer files of the base model."""
    model.config.dtype = dtype
    model.save_pretrained(folder, state_dict={k: v.to(dtype) for k, v in state_dict.items()})
    for path in open_model(config.model, config.family).ckpt.non_weight_files():
        if not (folder / path.name).exists():
            shutil.copy2(path, folder / path.name)
    for name, text in extra_files.items():
        (folder / name).write_text(text)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (empty when missing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
