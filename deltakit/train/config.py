"""The fine-tuning configuration: one dataclass, loadable from YAML, every field also a CLI flag."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deltakit.drift_rules import RULES
from deltakit.errors import DeltakitError


class ConfigError(DeltakitError):
    """A fine-tuning configuration that is incomplete or inconsistent."""


PRECISIONS = ("auto", "bf16", "fp32")
STRATEGIES = ("auto", "none", "ddp", "fsdp")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
FREEZABLE = ("vision", "projector", "text", "other")
BIAS_ORDERS = ("auto", "after_clip", "before_clip")
BIAS_AT = ("step", "micro_batch")
# Fields that may change between a run and its --resume; every other field must match the checkpoint.
RESUMABLE_CHANGES = frozenset({"resume", "force", "save_every", "keep_checkpoints", "log_every", "prior_device",
                               "gradient_checkpointing", "strategy", "batch_size", "grad_accum", "out", "run_dir",
                               "merge_lora", "skip_frozen", "cache_dir", "num_workers"})
RENAMED = {"cutoff_len": "max_length"}
"""Fields renamed since a checkpoint's fingerprint may have been written: new name -> old name."""
CUTOFF_POLICIES = ("truncate", "drop")
CACHE_PIXELS = ("auto", "float32", "bfloat16", "none")
"""How the data cache stores pixel values (deltakit.datacache.pixel_storage; docs/data.md, "Pixel storage")."""
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")
"""Left out of a resume fingerprint when ``lora_rank`` is 0, so checkpoints older than LoRA support still resume."""
DEFAULT_FREEZE = ("vision", "projector")


@dataclass
class TrainConfig:
    """Everything ``deltakit finetune`` needs (see ``docs/finetune.md``); YAML keys are the field names.

    ``batch_size`` is per process and micro-batch; the global batch of one optimizer step is
    ``batch_size * grad_accum * world_size`` examples. Without ``prior`` the run is plain SFT.
    """

    model: str | None = None
    data: str | None = None
    out: str | None = None
    prior: str | None = None
    rule: str = "adaptive"
    alpha: float = 1.0
    prior_device: str = "auto"
    bias_order: str = "auto"
    bias_at: str = "step"
    epochs: int = 3
    max_steps: int | None = None
    lr: float = 1e-6
    batch_size: int = 1
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    cutoff_len: int | None = None
    cutoff_policy: str = "truncate"
    enable_thinking: bool | None = None
    group_by_length: bool = False
    packing: bool = False
    num_workers: int | None = None
    cache_dir: str | None = None
    cache_pixels: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    freeze: tuple[str, ...] = DEFAULT_FREEZE
    strategy: str = "auto"
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    save_dtype: str = "auto"
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    merge_lora: bool = False
    skip_frozen: bool = False
    family: str | None = None
    run_dir: str | None = None
    log_every: int = 1
    resume: bool = False
    force: bool = False

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "TrainConfig":
        """Build from plain values (YAML or flags); unknown keys are an error naming the valid ones."""
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(cls.field_names())}")
        values = dict(data)
        for key in ("adam_betas", "freeze", "lora_targets"):
            if isinstance(values.get(key), str):
                values[key] = tuple(v.strip() for v in values[key].split(",") if v.strip())
            elif values.get(key) is not None:
                values[key] = tuple(values[key])
        if values.get("adam_betas") is not None:
            values["adam_betas"] = tuple(float(b) for b in values["adam_betas"])
        return cls(**values).validated(where)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides: Any) -> "TrainConfig":
        """Read a YAML file (when given) and apply ``overrides`` (None values are ignored)."""
        data: dict[str, Any] = {}
        where = "flags"
        if path is not None:
            where = str(path)
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
            data.update(loaded)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, where)

    def validated(self, where: str = "config") -> "TrainConfig":
        """Check values and required fields; returns self."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: {msg}")

        for key in ("model", "data", "out"):
            need(getattr(self, key) is not None, f"{key} is required (--{key} or '{key}:' in the YAML)")
        need(self.rule in RULES, f"rule must be one of {', '.join(RULES)}, not {self.rule!r}")
        need(self.alpha >= 0, f"alpha must be >= 0, not {self.alpha}")
        need(self.prior_device in ("auto", "cpu"), f"prior_device must be 'auto' or 'cpu', not {self.prior_device!r}")
        need(self.bias_order in BIAS_ORDERS, f"bias_order must be one of {', '.join(BIAS_ORDERS)}, not {self.bias_order!r}")
        need(self.bias_at in BIAS_AT, f"bias_at must be one of {', '.join(BIAS_AT)}, not {self.bias_at!r}")
        need(self.bias_at == "step" or self.bias_order != "after_clip",
             "bias_at micro_batch biases each micro-batch's gradient in backward, before clipping; bias_order after_clip contradicts it")
        need(self.epochs >= 1, f"epochs must be >= 1, not {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, not {self.max_steps}")
        need(self.lr > 0, f"lr must be > 0, not {self.lr}")
        need(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), not {self.warmup_ratio}")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), f"adam_betas must be two numbers in [0, 1), not {self.adam_betas}")
        need(self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0 disables clipping)")
        need(self.cutoff_len is None or self.cutoff_len >= 2, f"cutoff_len must be >= 2, not {self.cutoff_len}")
        need(self.cutoff_policy in CUTOFF_POLICIES, f"cutoff_policy must be one of {', '.join(CUTOFF_POLICIES)}, not {self.cutoff_policy!r}")
        need(self.num_workers is None or self.num_workers >= 0, f"num_workers must be >= 0, not {self.num_workers}")
        need(self.cache_pixels in CACHE_PIXELS, f"cache_pixels must be one of {', '.join(CACHE_PIXELS)}, not {self.cache_pixels!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        need(set(self.freeze) <= set(FREEZABLE), f"freeze takes roles from {', '.join(FREEZABLE)}, not {', '.join(self.freeze)}")
        need(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        need(self.save_every >= 0 and self.keep_checkpoints >= 1 and self.log_every >= 1, "save_every >= 0, keep_checkpoints >= 1, log_every >= 1")
        need(self.save_dtype in SAVE_DTYPES, f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, not {self.save_dtype!r}")
        self._validate_lora(need)
        return self

    def _validate_lora(self, need) -> None:
        """The LoRA fields: consistent with each other and with what LoRA training supports."""
        from deltakit.engine.selection import SelectionError, parse_modules

        need(isinstance(self.lora_rank, int) and self.lora_rank >= 0,
             f"lora_rank must be an integer >= 0 (0 = full fine-tuning), not {self.lora_rank!r}")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be > 0, not {self.lora_alpha}")
        lora = self.lora_rank > 0
        for key in ("lora_alpha", "lora_targets", "merge_lora"):
            need(lora or not getattr(self, key), f"{key} needs lora_rank > 0 (--lora-rank R)")
        if self.lora_targets:
            try:
                parse_modules(self.lora_targets)
            except SelectionError as exc:
                need(False, f"lora_targets: {exc}")
        if lora:
            need(set(self.freeze) == set(DEFAULT_FREEZE), "freeze applies to full fine-tuning; with lora_rank > 0 every base weight is "
                                                          f"frozen and only the adapters train (leave freeze at {','.join(DEFAULT_FREEZE)})")
            need(self.strategy != "fsdp", "LoRA under FSDP2 is not supported yet; use strategy ddp (or auto) for LoRA runs")
            need(getattr(self, "bias_at", "step") == "step", "bias_at micro_batch is not supported with LoRA (its hooks bias whole "
                                                             "parameters only); use bias_at step")

    @property
    def resolved_lora_alpha(self) -> float:
        """``lora_alpha``, or ``2 * lora_rank`` when unset (LoRA scaling ``s = lora_alpha / lora_rank`` = 2, as PEFT defines it)."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def resolved_bias_order(self) -> str:
        """``bias_order`` with ``auto`` resolved: ``before_clip`` for the absolute rule, ``after_clip`` otherwise.

        Why (docs/finetune.md, "Where the bias sits"): with clip factor ``s``, absolute after clipping gives
        ``s g - a D`` (the data-to-prior ratio shrinks by ``s``), before clipping ``s' (g - a D)`` (ratio kept);
        gradnorm and adaptive are homogeneous in ``g`` (``c(s g) = s c(g)``), so both orders give a multiple
        of ``g - c D`` and keep the ratio; after clipping then keeps plain SFT's clip factor. micro_batch
        placement is always before clipping.
        """
        if self.bias_at == "micro_batch":
            return "before_clip"
        if self.bias_order != "auto":
            return self.bias_order
        return "before_clip" if self.rule == "absolute" else "after_clip"

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """Arguments for the chat template: ``enable_thinking`` when set (Qwen3's thinking switch)."""
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}

    @property
    def run_path(self) -> Path:
        """Folder for checkpoints and the live log: ``run_dir``, else ``<out>.run`` beside the output."""
        return Path(self.run_dir) if self.run_dir else Path(f"{self.out}.run")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.field_names()}
