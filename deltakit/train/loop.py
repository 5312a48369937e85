"""``finetune(config)``: supervised fine-tuning of an MLLM, optionally with the DRIFT gradient bias.

One optimizer step (:func:`train_step`):

1. forward/backward every micro-batch of this process; the loss is the summed token cross-entropy
   divided by the number of target tokens in the *whole global batch* (all micro-batches, all
   processes) and multiplied by the world size (DDP and FSDP average gradients), so the step's gradient
   is the same whatever the split into micro-batches and processes;
2. gradients are reduced across processes only in the last micro-batch's backward;
3. clip the gradient to ``max_grad_norm``;
4. DRIFT: ``g -= c * D`` on the accumulated, reduced gradient, once per step: after clipping
   (``bias_order: after_clip``) or before it (``before_clip``, clipping then acts on ``g - c D``);
   ``auto`` is before_clip for the absolute rule, after_clip for gradnorm and adaptive;
5. AdamW step at ``lr * plan.lr_factor(step)``.

Why those defaults (derivation in docs/finetune.md): with clip factor ``s``, absolute after clipping gives
``s g - a D`` and shrinks the data-to-prior ratio by ``s``, before clipping ``s' (g - a D)`` keeps it;
gradnorm and adaptive are homogeneous in ``g``, so both orders keep it and after clipping keeps plain
SFT's clip factor. ``bias_at: micro_batch`` instead biases each micro-batch's local gradient in
backward (the public code's placement, for reproducing it). The logged grad norm is the norm clipping
acts on: the data gradient's with after_clip, the biased gradient's otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from deltakit.curves import EventWriter, plot_curves, record_scalars
from deltakit.datacache import CacheRequest, CachedDataset
from deltakit.drift import DriftBias, DriftStep
from deltakit.errors import DeltakitError
from deltakit.io.writer import atomic_output_dir, check_output_free
from deltakit.progress import ProgressFn, no_progress
from deltakit.train import dist
from deltakit.train.checkpoint import list_checkpoints, load_checkpoint, read_state, remove_incomplete, save_checkpoint
from deltakit.train.config import LORA_FIELDS, RENAMED, RESUMABLE_CHANGES, ConfigError, TrainConfig
from deltakit.train.loader import (MicroBatchSampler, StepOrder, check_packable, default_workers, lengths_of, make_loader,
                                   packed_inputs, padding_tokens, steps)
from deltakit.train.setup import Plan, add_lora, load_data, load_model, open_prior, read_jsonl, save_dtype, save_final, save_lora

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class TrainResult:
    """Summary of a run: where the model went, how many steps, the last losses, the prior binding, the log."""

    out: Path
    steps: int
    global_batch: int
    final_loss: float
    seconds: float
    drift_tensors: int
    drift_params: int
    resumed_from: int
    history: list[dict[str, Any]] = field(default_factory=list)
    drift_skipped: int = 0
    lora_modules: int = 0
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_loss_sum(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Summed next-token cross-entropy over target tokens (labels != -100), computed in float32."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def count_targets(batch: dict[str, Any]) -> torch.Tensor:
    """Target tokens of a batch after the next-token shift."""
    return (batch["labels"][:, 1:] != IGNORE).sum()


def _scalar(t: torch.Tensor) -> float:
    return float(t.full_tensor() if isinstance(t, DTensor) else t)


def train_step(model: torch.nn.Module, micro: list[dict], params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               lr: float, bias: DriftBias | None, env: dist.DistEnv, config: TrainConfig, autocast) -> dict[str, Any]:
    """One optimizer step on this process's micro-batches (see the module docstring); returns its log record
    (``tokens``: target tokens, ``input_tokens`` and ``padding``: real and padding positions, all of the global batch)."""
    real, pad = (sum(x) for x in zip(*(padding_tokens(b) for b in micro)))
    counts = env.all_reduce_sum(torch.stack([sum(count_targets(b) for b in micro),
                                             torch.tensor(real, device=env.device), torch.tensor(pad, device=env.device)]))
    n_tokens = counts[0].clamp_min(1)
    loss_sum = torch.zeros((), device=env.device)
    for i, batch in enumerate(micro):
        with dist.grad_sync(model, i == len(micro) - 1), autocast():
            loss = token_loss_sum(model, batch) * (env.world_size / n_tokens)
        loss.backward()
        loss_sum += loss.detach()
    grads = [p.grad for p in params if p.grad is not None]
    drift: DriftStep | None = None
    if bias is not None and config.bias_at == "micro_batch":
        drift = bias.micro_batch_step()  # the hooks biased each micro-batch's gradient in backward
    elif bias is not None and config.resolved_bias_order == "before_clip":
        drift = bias.apply()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm else torch.nn.utils.get_total_norm(grads)
    if bias is not None and drift is None:
        drift = bias.apply()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record = {"loss": _scalar(env.all_reduce_sum(loss_sum)) / env.world_size, "lr": lr, "grad_norm": _scalar(grad_norm),
              "tokens": int(n_tokens), "input_tokens": int(counts[1]), "padding": int(counts[2])}
    if drift is not None:
        record.update(drift_cos=drift.cos, drift_ratio=drift.bias_ratio)
    return record


def finetune(config: TrainConfig, progress: ProgressFn = no_progress) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` into ``config.out``; DRIFT when ``config.prior`` is set.

    Works alone or in every process of a ``torchrun`` launch (DDP or FSDP2). Checkpoints every
    ``save_every`` steps into ``<out>.run/checkpoints``; ``resume`` continues from the newest one and ends
    with the same weights as an uninterrupted run. Without a prior (or with ``alpha`` 0) it is plain SFT.
    """
    config.validated()
    env = dist.setup(config.strategy)
    try:
        return _run(config, env, progress if env.is_main else no_progress)
    finally:
        env.close()


def _fingerprint(config: TrainConfig, plan: Plan) -> dict[str, Any]:
    keep = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and (config.lora_rank or k not in LORA_FIELDS)}
    return json.loads(json.dumps({**keep, "global_batch": plan.global_batch, "total_steps": plan.total_steps}))


def fingerprint_mismatch(now: dict[str, Any], saved: dict[str, Any], plan: Plan) -> str | None:
    """The first setting of this run that differs from the checkpoint's fingerprint, as a sentence; None if all match.

    A field the checkpoint's deltakit did not have yet counts as its default then, a renamed one by its
    old name (:data:`~deltakit.train.config.RENAMED`), so older checkpoints keep resuming.
    """
    defaults = _fingerprint(TrainConfig(), plan)
    for k in now:
        was = saved.get(k, saved.get(RENAMED.get(k, k), defaults.get(k)))
        if was != now[k]:
            return f"{k} is {now[k]!r} but the checkpoint was made with {was!r}"
    return None


def _start(config: TrainConfig, plan: Plan, model, optimizer, env) -> int:
    """Step to start from: 0, or the newest checkpoint's step under ``resume`` (after checking it fits).

    What a killed run was writing is removed first (logged), so only complete checkpoints are resumed.
    """
    removed = remove_incomplete(config.run_path / "checkpoints") if env.is_main else []
    env.barrier()
    ckpts = list_checkpoints(config.run_path / "checkpoints")
    if not config.resume:
        if ckpts and not config.force:
            raise DeltakitError(f"{config.run_path}: holds checkpoints of an earlier run; pass --resume to continue it or --force to start over")
        if ckpts and env.is_main:
            shutil.rmtree(config.run_path / "checkpoints")
        env.barrier()
        return 0
    if not ckpts:
        unfinished = f" (only the unfinished {removed[0].name}, now removed)" if removed else ""
        raise DeltakitError(f"--resume: no checkpoint in {config.run_path / 'checkpoints'}{unfinished}; "
                            "run without --resume to start over")
    mismatch = fingerprint_mismatch(_fingerprint(config, plan), read_state(ckpts[-1])["fingerprint"], plan)
    if mismatch:  # checked before loading: a LoRA rank changes shapes
        raise ConfigError(f"--resume: {mismatch}")
    state = load_checkpoint(ckpts[-1], model, optimizer, env)
    log.info("resuming from %s (step %d of %d)", ckpts[-1], state["step"], plan.total_steps)
    return state["step"]


CURVES_PNG = "train_curves.png"


def _open_cache(request: CacheRequest, env: dist.DistEnv, progress: ProgressFn) -> CachedDataset:
    """The data cache entry, built by the main process (with the progress bar) while the others wait, then opened by all."""
    if env.is_main:
        dataset = request.open(progress)
    env.barrier()
    if not env.is_main:
        dataset = request.open()
    counts = dataset.stats["counts"]
    if counts["truncated"] or len(dataset) < sum(counts.values()):
        log.warning("cutoff %d (%s): %d examples kept whole, %d truncated, %d dropped (prompt or images past the cutoff: %d, "
                    "longer with policy drop: %d); %d tokens cut, %d of them trained", request.max_length, request.cutoff_policy,
                    counts["kept"], counts["truncated"], sum(v for k, v in counts.items() if k.startswith("dropped")),
                    counts["dropped_prompt"] + counts["dropped_image"], counts["dropped_long"], dataset.stats["tokens_cut"],
                    dataset.stats["targets_cut"])
    return dataset


def _data_info(dataset, config: TrainConfig, workers: int) -> dict[str, Any]:
    """What the summary says about the data: examples, the cache entry and its cutoff counts, loader workers, batching."""
    info: dict[str, Any] = {"examples": len(dataset), "workers": workers, "group_by_length": config.group_by_length,
                            "packing": config.packing}
    if isinstance(dataset, CachedDataset):
        info.update(cache=str(dataset.folder), cache_pixels=dataset.pixels, cutoff_len=config.cutoff_len, cutoff_policy=config.cutoff_policy, **dataset.stats)
    return info


def _event_writer(run_path: Path, kept: list[dict[str, Any]]) -> EventWriter:
    """A fresh TensorBoard event file in ``run_path`` holding the ``kept`` records (those of a resumed run's
    checkpoint); event files of earlier attempts are removed, so the curves match the JSONL log."""
    for old in run_path.glob("events.out.tfevents.*"):
        old.unlink()
    events = EventWriter(run_path)
    for r in kept:
        events.add(r["step"], record_scalars(r))
    return events


def _run(config: TrainConfig, env: dist.DistEnv, progress: ProgressFn) -> TrainResult:
    check_output_free(config.out, config.force)
    if config.prior is not None and config.bias_at == "micro_batch" and env.strategy == "fsdp":
        raise ConfigError("bias_at micro_batch is not supported under FSDP2 (a micro-batch's local gradient exists only unsharded inside "
                          "FSDP's backward, and biasing it there needs the whole D on every process): use strategy ddp or bias_at step")
    started = time.perf_counter()
    prior = open_prior(config.prior) if config.prior is not None else None
    torch.manual_seed(config.seed)
    model, family = load_model(config)
    if config.packing:
        check_packable(model)
    if config.lora_rank:
        model = add_lora(model, family, config)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and env.device.type == "cuda" and torch.cuda.is_bf16_supported())
    fsdp = env.strategy == "fsdp"
    wrapped = dist.wrap(model, env, torch.bfloat16 if bf16 and fsdp else None)
    bias = None
    if prior is not None:
        prior_device = "cpu" if config.prior_device == "cpu" else None
        bias = DriftBias.bind(model, prior, config.rule, config.alpha, family, prior_device, skip_frozen=config.skip_frozen)
        if config.bias_at == "micro_batch":
            bias.micro_batch_hooks()
    dataset, collate, _ = load_data(config)
    if isinstance(dataset, CacheRequest):
        dataset.compute_dtype, dataset.model_type = torch.bfloat16 if bf16 else torch.float32, model.config.model_type
        dataset = _open_cache(dataset, env, progress)
    plan = Plan.make(len(dataset), config, env.world_size)
    order = StepOrder(plan.examples, plan.global_batch, plan.steps_per_epoch, config.seed,
                      lengths_of(dataset) if config.group_by_length else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps, weight_decay=config.weight_decay)
    start = _start(config, plan, wrapped, optimizer, env)
    log_path = config.run_path / "log.jsonl"
    events = None
    if env.is_main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_jsonl(log_path) if r["step"] <= start] if start else []
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        events = _event_writer(config.run_path, kept)
    workers = config.num_workers if config.num_workers is not None else default_workers(dataset, env.world_size)
    sampler = MicroBatchSampler(order, start, plan.total_steps, env.rank, config.batch_size, config.grad_accum)
    loader = make_loader(dataset, sampler, collate, workers, pin_memory=env.device.type == "cuda")
    data_info = _data_info(dataset, config, workers)
    log.info("%d examples, global batch %d, %d steps (%d per epoch), warmup %d, %s", plan.examples, plan.global_batch,
             plan.total_steps, plan.steps_per_epoch, plan.warmup_steps, f"DRIFT {config.rule}, bias at {config.bias_at}, {config.resolved_bias_order}" if bias else "plain SFT")

    def autocast():
        return torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 and not fsdp else contextlib.nullcontext()

    progress(0, total=plan.total_steps - start, description="finetune")
    history: list[dict[str, Any]] = []
    prepare = packed_inputs(model) if config.packing else (lambda batch: batch)
    for step, micro, waited in steps(loader, start, config.grad_accum, env.device, prepare):
        began = time.perf_counter() - waited
        record = {"step": step + 1, **train_step(wrapped, micro, params, optimizer, config.lr * plan.lr_factor(step), bias, env, config, autocast)}
        seconds = time.perf_counter() - began
        record.update(step_s=seconds, data_s=waited, data_share=waited / seconds, tokens_per_s=record["input_tokens"] / seconds)
        history.append(record)
        if env.is_main and ((step + 1) % config.log_every == 0 or step + 1 == plan.total_steps):
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            events.add(record["step"], record_scalars(record))
        progress(1, info=f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  |g| {record['grad_norm']:.3g}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < plan.total_steps:
            state = {"step": step + 1, "fingerprint": _fingerprint(config, plan), "world_size": env.world_size}
            save_checkpoint(config.run_path / "checkpoints" / f"step-{step + 1:07d}", wrapped, optimizer, state, env, config.keep_checkpoints)
    full = dist.full_state_dict(model) if not config.lora_rank else None  # LoRA saves the adapter (and merges) instead
    final_loss = history[-1]["loss"] if history else float("nan")
    result = TrainResult(Path(config.out), plan.total_steps, plan.global_batch, final_loss, time.perf_counter() - started,
                         bias.num_tensors if bias else 0, bias.num_params if bias else 0, start, history,
                         drift_skipped=bias.num_skipped if bias else 0,
                         lora_modules=len(model.peft_config["default"].target_modules) if config.lora_rank else 0,
                         data=data_info)
    if env.is_main:
        events.close()
        plot_curves(read_jsonl(log_path), config.run_path / CURVES_PNG, title=f"{Path(config.out).name}: "
                    + (f"DRIFT {config.rule}, alpha {config.alpha:g}" if bias else "plain SFT"))
        with atomic_output_dir(config.out, config.force) as tmp:
            summary = json.dumps({"config": config.to_dict(), "result": {k: v for k, v in result.to_dict().items() if k != "history"}},
                                 indent=2, default=str)
            files = {"deltakit_finetune.json": summary + "\n", "train_log.jsonl": log_path.read_text()}
            (tmp / "runs").mkdir()
            shutil.copy2(events.path, tmp / "runs" / events.path.name)
            shutil.copy2(config.run_path / CURVES_PNG, tmp / CURVES_PNG)
            if config.lora_rank:
                save_lora(model, config, tmp, save_dtype(config), files)
            else:
                save_final(model, full, config, tmp, save_dtype(config), files)
        log.info("saved %s (%d steps, final loss %.4f)", config.out, plan.total_steps, final_loss)
    env.barrier()
    return result
