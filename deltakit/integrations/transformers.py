"""The DRIFT bias as a ``transformers.TrainerCallback``.

``Trainer`` (and TRL's ``SFTTrainer``, a subclass) calls ``on_pre_optimizer_step`` once per optimizer
step, after gradient accumulation, the DDP/FSDP gradient reduction and clipping: the place where
``deltakit finetune`` applies the bias too. The callback binds the prior at ``on_train_begin`` through
the family table (:meth:`deltakit.drift.DriftBias.bind`: a wrong family, a prior tensor with no
parameter, a shape mismatch or a frozen target stop the run before its first step), biases the
gradients in ``on_pre_optimizer_step``, and adds the mean ``cos(g, D)`` and ``|c D| / |g|`` since the
last log to the Trainer's logs as ``drift_cos`` and ``drift_ratio``.

    from deltakit.integrations import DriftCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DriftCallback("prior.safetensors")])
    trainer.train()
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback

from deltakit.drift import DriftBias, PriorSource
from deltakit.drift_rules import check_rule
from deltakit.errors import DeltakitError

log = logging.getLogger(__name__)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names the family table knows (DDP's ``.module`` removed)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


class DriftCallback(TrainerCallback):
    """Bias every prior-carrying gradient with a DRIFT rule, once per optimizer step.

    ``prior`` is a prior file written by ``deltakit prior`` (a path) or an opened prior (anything with the
    :class:`deltakit.drift.PriorSource` protocol, e.g. :class:`deltakit.prior.Prior`). ``rule`` and
    ``alpha`` as in ``deltakit finetune``; ``family`` overrides detection; ``prior_device="cpu"`` keeps D
    on the CPU (slower, for tight GPU memory). A PEFT LoRA model works too: prior tensors on LoRA-wrapped frozen
    weights bias the adapter factors; ``skip_frozen=True`` leaves out those on frozen weights with no adapter
    (else an error). After training, :attr:`bias` is the bound
    :class:`~deltakit.drift.DriftBias` and :attr:`history` the per-step statistics.
    """

    def __init__(self, prior: str | os.PathLike | PriorSource, rule: str = "adaptive", alpha: float = 1.0,
                 family: str | None = None, prior_device: str | None = None, skip_frozen: bool = False):
        self.rule = check_rule(rule)
        self.alpha = float(alpha)
        self.family = family
        self.prior_device = prior_device
        self.skip_frozen = skip_frozen
        self._prior = prior
        self.bias: DriftBias | None = None
        self.history: list[dict[str, float]] = []
        self._pending: list[tuple[float, float]] = []

    def _open_prior(self) -> PriorSource:
        if isinstance(self._prior, (str, os.PathLike)):
            from deltakit.prior import Prior

            self._prior = Prior.open(self._prior)
        return self._prior

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            raise DeltakitError("DriftCallback needs the model at on_train_begin (use it with transformers' Trainer)")
        if getattr(args, "deepspeed", None):
            raise DeltakitError("DriftCallback does not support DeepSpeed (its gradients live in DeepSpeed's partitions, "
                                "outside param.grad); use FSDP2 (fsdp='full_shard' with fsdp_config={'fsdp_version': 2}), "
                                "which shards D with the weights")
        self.bias = DriftBias.bind(_unwrap(model), self._open_prior(), self.rule, self.alpha, self.family, self.prior_device,
                                   skip_frozen=self.skip_frozen)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = self.bias.apply()
        self._pending.append((step.cos, step.bias_ratio))
        self.history.append({"step": state.global_step + 1, "drift_cos": step.cos, "drift_ratio": step.bias_ratio})

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        """Add the mean statistics of the steps since the last log to ``logs`` and to ``state.log_history``.

        Reporting callbacks listed before this one (transformers puts ``report_to`` integrations first)
        have already seen ``logs``; to send these to TensorBoard or W&B too, put the callback first:
        ``trainer.callback_handler.callbacks.insert(0, callback)``.
        """
        if logs is None or not self._pending or "loss" not in logs:
            return
        n = len(self._pending)
        extra = {"drift_cos": sum(c for c, _ in self._pending) / n, "drift_ratio": sum(r for _, r in self._pending) / n}
        self._pending.clear()
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
