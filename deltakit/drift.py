"""DRIFT gradient bias: pull each gradient toward a reasoning prior D = theta_reason - theta_VL.

Every rule (arXiv 2510.15050) replaces a parameter's gradient ``g`` by ``g' = g - c * D`` with one
scalar ``c`` per tensor (``a`` is alpha, ``D^ = D / |D|``, norms are Frobenius norms of the whole tensor):

======== ======================================== ================================
rule     g'                                       c
======== ======================================== ================================
absolute ``g - a D``                              ``a``
gradnorm ``g - a |g| D^``                         ``a |g| / |D|``
adaptive ``g - a (1 + cos(g, D)) / 2 |g| D^``     ``a (1 + <g,D>/(|g||D|)) / 2 |g| / |D|``
======== ======================================== ================================

so a descent step ``theta -= lr * g'`` moves theta toward the reasoning model. ``c`` needs three
numbers per tensor, ``|g|^2``, ``|D|^2`` and ``<g, D>``: :func:`tensor_stats` computes them on the part
of a tensor this process holds, they are summed over the shards of a tensor (one all-reduce per step
under FSDP2), and :func:`coefficients` turns them into ``c``. Because the sums are exact, a sharded run
biases exactly as an unsharded one.

Zeros: norms are floored at :data:`EPS` before dividing. A zero gradient gives ``c = 0`` for gradnorm
and adaptive (``|g| = 0``; the cosine is taken as 0), so no bias; a zero ``D`` adds nothing under any
rule (``c * 0``). Small but non-zero norms are used as they are.

:class:`DriftBias` binds a prior to a model's parameters through the family mapping and applies the rule
to the accumulated gradient, once per optimizer step (see ``docs/finetune.md`` for where that sits).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from deltakit.drift_rules import check_rule
from deltakit.errors import DeltakitError, IncompatibleError
from deltakit.families import Family
from deltakit.model import map_parameters

log = logging.getLogger(__name__)

EPS = 1e-12


class PriorSource(Protocol):
    """What :class:`DriftBias` needs from a prior (:class:`deltakit.prior.Prior` provides it).

    A prior may also carry ``family`` (the family name it was exported for); :meth:`DriftBias.bind` then
    requires the model to be of exactly that family.
    """

    names: Sequence[str]

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor: ...

    def alpha(self, name: str) -> float: ...


def tensor_stats(g: torch.Tensor, d: torch.Tensor, d_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``[|g|^2, |D|^2, <g, D>]`` of (this process's part of) one tensor, as float64.

    The products are accumulated in float32 (pairwise, exact enough for a scale factor) and returned in
    float64 so that sums over shards and tensors lose nothing further. ``d_sq``, when given, is used as
    ``|D|^2`` of this part (D is constant, so callers compute it once).
    """
    g32 = g.reshape(-1).float()
    d32 = d.reshape(-1).to(device=g.device, dtype=torch.float32)
    dd = torch.dot(d32, d32) if d_sq is None else d_sq.to(device=g.device, dtype=torch.float32)
    return torch.stack([torch.dot(g32, g32), dd, torch.dot(g32, d32)]).double()


def coefficients(stats: torch.Tensor, alpha: torch.Tensor, rule: str) -> torch.Tensor:
    """Per-tensor ``c`` of ``g' = g - c D`` from ``stats`` (rows ``[|g|^2, |D|^2, <g,D>]``) and ``alpha``."""
    check_rule(rule)
    alpha = alpha.to(stats)
    if rule == "absolute":
        return alpha.clone()
    g_norm = stats[..., 0].clamp_min(0).sqrt()
    d_norm = stats[..., 1].clamp_min(0).sqrt()
    scale = alpha * g_norm / d_norm.clamp_min(EPS)
    if rule == "gradnorm":
        return scale
    cos = stats[..., 2] / (g_norm * d_norm).clamp_min(EPS)
    return scale * (1 + cos.clamp(-1, 1)) / 2


def drift_gradient(g: torch.Tensor, d: torch.Tensor, alpha: float, rule: str) -> torch.Tensor:
    """The biased gradient ``g - c D`` of one whole (unsharded) tensor; a new tensor, ``g`` is untouched."""
    c = coefficients(tensor_stats(g, d), torch.tensor(alpha, dtype=torch.float64), rule)
    return g - (c.item() * d.to(g))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_groups(param: torch.Tensor) -> tuple:
    """Process groups over which ``param`` is split (empty for a whole or replicated tensor)."""
    if not isinstance(param, DTensor):
        return ()
    mesh = param.device_mesh
    return tuple(mesh.get_group(i) for i, p in enumerate(param.placements) if p.is_shard())


@dataclass
class Target:
    """One parameter carrying a prior: its canonical and in-memory names, the parameter, this process's part of D, alpha."""

    canonical: str
    name: str
    param: torch.nn.Parameter
    prior: torch.Tensor
    alpha: float


@dataclass(frozen=True)
class DriftStep:
    """What one bias application did: the mean cosine(g, D) over tensors and |sum c D| / |g| over all of them."""

    cos: float
    bias_ratio: float


class DriftBias:
    """A DRIFT rule bound to parameters; :meth:`apply` biases their gradients in place.

    Build it with :meth:`bind`. Call :meth:`apply` once per optimizer step on the final, accumulated and
    (in DDP/FSDP runs) already reduced gradient.
    """

    def __init__(self, targets: list[Target], rule: str, alpha: float):
        self.rule = check_rule(rule)
        self.alpha = float(alpha)
        self.targets = targets
        self._alphas = torch.tensor([self.alpha * t.alpha for t in targets], dtype=torch.float64)
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(targets):
            key = _shard_groups(t.param)
            if key:
                groups.setdefault(key, []).append(i)
        self._shard_rows = [(key, torch.tensor(rows)) for key, rows in groups.items()]
        # |D|^2 of this process's part never changes: computed once, summed over shards with the other stats each step.
        self._d_sq = [tensor_stats(t.prior, t.prior)[0].float().to(_local(t.param).device) for t in targets]

    @property
    def num_tensors(self) -> int:
        return len(self.targets)

    @property
    def num_params(self) -> int:
        return sum(t.param.numel() for t in self.targets)

    @classmethod
    def bind(cls, model: torch.nn.Module, prior: PriorSource, rule: str = "adaptive", alpha: float = 1.0,
             family: str | Family | None = None, prior_device: torch.device | str | None = None) -> "DriftBias":
        """Map every prior tensor to its parameter of ``model`` (in-memory names, via the family table).

        Fails with :class:`IncompatibleError` when the prior names a ``family`` other than the model's (the
        family name is compared, not the key layout: qwen2_vl and qwen2_5_vl share a layout but not weights,
        so D of one means nothing for the other), when a prior tensor finds no parameter, a shape differs or
        the parameter is frozen: a prior is never silently ignored. Each D is read once in its stored
        dtype and placed on its parameter's device (or ``prior_device``), split like the parameter when
        it is an FSDP2 DTensor. ``model`` must be unwrapped (not inside DDP).
        """
        check_rule(rule)
        fam, _, text = map_parameters(model, family)
        built_for = getattr(prior, "family", None)
        if built_for is not None and built_for != fam.name:
            raise IncompatibleError(
                f"the prior was built for a {built_for} model but this model is {fam.name}; a prior only fits the family it was "
                f"exported against (same key layout is not enough), so export one with deltakit prior --mllm <this model>")
        params = dict(model.named_parameters())
        names = list(prior.names)
        missing = [n for n in names if n not in text]
        if missing:
            raise IncompatibleError(
                f"prior tensor {missing[0]!r} (and {len(missing) - 1} more) matches no parameter of this {fam.name} model "
                f"(text tower has {len(text)} tensors, e.g. {next(iter(text), 'none')!r}); is the prior from another model?")
        targets = []
        for n in names:
            p = params[text[n]]
            if tuple(prior.shape(n)) != tuple(p.shape):
                raise IncompatibleError(f"prior tensor {n!r} has shape {tuple(prior.shape(n))} but parameter {text[n]!r} has {tuple(p.shape)}")
            if not p.requires_grad:
                raise IncompatibleError(f"prior tensor {n!r} targets frozen parameter {text[n]!r}; unfreeze it or drop it from the prior")
            device = torch.device(prior_device) if prior_device is not None else _local(p).device
            if isinstance(p, DTensor):
                full = prior.get(n, device=p.device_mesh.device_type)
                d = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                d = d.to(device, copy=True)
                del full
            else:
                d = prior.get(n, device=device)
                d = d.clone() if d.device.type == "cpu" else d
            targets.append(Target(n, text[n], p, d, float(prior.alpha(n))))
        bias = cls(targets, rule, alpha)
        log.info("DRIFT prior: %d tensors, %s parameters carry a prior (rule %s, alpha %g, %s)", bias.num_tensors,
                 f"{bias.num_params:,}", rule, alpha, "prior on cpu" if prior_device == "cpu" else "prior on the training device")
        return bias

    def _sum_over_shards(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum the per-tensor rows of sharded targets over their shards (one all-reduce per shard group)."""
        for key, idx in self._shard_rows:
            idx = idx.to(rows.device)
            part = rows[idx]
            for group in key:
                dist.all_reduce(part, group=group)
            rows[idx] = part
        return rows

    def apply(self) -> DriftStep:
        """Bias every target's ``.grad`` in place (``g -= c D``); a parameter without a gradient is an error."""
        grads = []
        for t in self.targets:
            if t.param.grad is None:
                raise DeltakitError(f"parameter {t.name!r} carries a prior but got no gradient (is it used in the forward pass?)")
            grads.append(_local(t.param.grad))
        stats = self._sum_over_shards(torch.stack([tensor_stats(g, t.prior, dd) for g, t, dd in zip(grads, self.targets, self._d_sq)]))
        c = coefficients(stats, self._alphas.to(stats.device), self.rule)
        c_list = c.tolist()
        for g, t, ci in zip(grads, self.targets, c_list):
            if ci != 0.0:
                g.add_(t.prior if t.prior.device == g.device else t.prior.to(g.device, non_blocking=True), alpha=-ci)
        g_norm, d_norm = stats[:, 0].clamp_min(0).sqrt(), stats[:, 1].clamp_min(0).sqrt()
        cos = stats[:, 2] / (g_norm * d_norm).clamp_min(EPS)
        ratio = (c.square() * stats[:, 1]).sum().sqrt() / stats[:, 0].sum().sqrt().clamp_min(EPS)
        return DriftStep(cos=float(cos.mean()) if len(c_list) else 0.0, bias_ratio=float(ratio))
