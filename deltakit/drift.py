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

Zeros: ``c = 0`` wherever ``D = 0`` (nothing to pull toward, under every rule); a zero gradient gives
``c = 0`` for gradnorm and adaptive (``|g| = 0``; the cosine is taken as 0). Each norm is floored at
:data:`EPS` on its own before dividing; small but non-zero norms are used as they are.

MoE experts: a fused expert parameter (``mlp.experts.gate_up_proj`` [E, 2I, H]) holds one canonical
tensor per expert and projection, and each gets its own ``c`` from its own three sums, exactly as if
the experts were separate weights (as Qwen3-MoE stores them on disk).

:class:`DriftBias` binds a prior to a model's parameters through the family mapping and applies the rule
to the accumulated gradient, once per optimizer step (see ``docs/finetune.md`` for where that sits).

LoRA: a prior tensor whose weight is frozen and wrapped by an active PEFT LoRA adapter (``W + s B A``)
biases the adapter's factors instead, each with the rule applied to its own projection of D,
``D_A = s B^T D`` and ``D_B = s D A^T`` (recomputed from the current factors every step; see
:mod:`deltakit.lora`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from deltakit.drift_rules import check_rule
from deltakit.errors import DeltakitError, IncompatibleError
from deltakit.families import Family, Part
from deltakit.lora import LoraTarget, base_model_of, lora_layers, lora_targets_of, named_view, plain_parameters
from deltakit.model import map_parameters, part_of

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


def tensor_stats(g: torch.Tensor, d: torch.Tensor, d_sq: torch.Tensor | None = None, segments: int = 1) -> torch.Tensor:
    """``[|g|^2, |D|^2, <g, D>]`` of (this process's part of) one tensor, as float64.

    The products are accumulated in float32 (pairwise, exact enough for a scale factor) and returned in
    float64 so that sums over shards and tensors lose nothing further. ``d_sq``, when given, is used as
    ``|D|^2`` (D is constant, so callers compute it once). With ``segments`` > 1 the tensor is cut into
    that many equal consecutive pieces (the experts of a fused MoE tensor) and the result has one row each.
    """
    g32 = g.reshape(segments, -1).float()
    d32 = d.reshape(segments, -1).to(device=g.device, dtype=torch.float32)
    dd = (d32 * d32).sum(1) if d_sq is None else d_sq.to(device=g.device, dtype=torch.float32).reshape(segments)
    out = torch.stack([(g32 * g32).sum(1), dd, (g32 * d32).sum(1)], 1).double()
    return out[0] if segments == 1 else out


def coefficients(stats: torch.Tensor, alpha: torch.Tensor, rule: str) -> torch.Tensor:
    """Per-tensor ``c`` of ``g' = g - c D`` from ``stats`` (rows ``[|g|^2, |D|^2, <g,D>]``) and ``alpha``.

    ``c`` is 0 wherever ``D`` is 0 (nothing to pull toward); each norm is floored at :data:`EPS` on its
    own before dividing, so a small but non-zero norm does not shrink the cosine.
    """
    check_rule(rule)
    alpha = alpha.to(stats)
    g_norm = stats[..., 0].clamp_min(0).sqrt()
    d_norm = stats[..., 1].clamp_min(0).sqrt()
    has_d = d_norm > 0
    if rule == "absolute":
        return torch.where(has_d, alpha, torch.zeros_like(alpha))
    scale = torch.where(has_d, alpha * g_norm / d_norm.clamp_min(EPS), torch.zeros_like(g_norm))
    if rule == "gradnorm":
        return scale
    cos = stats[..., 2] / (g_norm.clamp_min(EPS) * d_norm.clamp_min(EPS))
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
    """One parameter carrying a prior: its in-memory name, the parameter, this process's part of D.

    A parameter is cut into ``len(canonicals)`` equal consecutive segments, each one canonical tensor
    with its own rule coefficient: one for a plain weight, ``E`` or ``2E`` for a fused MoE expert tensor
    (``down_proj`` [E, H, I], ``gate_up_proj`` [E, 2I, H]: expert j's gate then up). ``canonicals[i]`` is
    None for a segment the prior does not cover (its D is 0); ``alphas`` are per segment. Under FSDP2
    this process holds segments ``[first, first + local)``.
    """

    name: str
    param: torch.nn.Parameter
    prior: torch.Tensor
    canonicals: list[str | None]
    alphas: list[float]
    first: int = 0
    local: int = 1

    @property
    def canonical(self) -> str | None:
        """The canonical name of a one-segment target."""
        return self.canonicals[0] if len(self.canonicals) == 1 else None


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

    def __init__(self, targets: list[Target], rule: str, alpha: float, lora_targets: Sequence[LoraTarget] = ()):
        self.rule = check_rule(rule)
        self.alpha = float(alpha)
        self.targets = targets
        self.lora_targets = list(lora_targets)
        self.skipped: list[str] = []  # prior tensors left out by bind(skip_frozen=True)
        self._lora_alphas = torch.tensor([self.alpha * t.alpha for t in self.lora_targets for _ in t.factors], dtype=torch.float64)
        self._alphas = torch.tensor([self.alpha * a for t in targets for a in t.alphas], dtype=torch.float64)
        self._rows = []  # each target's first row in the per-segment statistics
        groups: dict[tuple, list[int]] = {}
        row = 0
        for t in targets:
            self._rows.append(row)
            key = _shard_groups(t.param)
            if key:
                groups.setdefault(key, []).extend(range(row, row + len(t.canonicals)))
            row += len(t.canonicals)
        self._covered = torch.tensor([c is not None for t in targets for c in t.canonicals])
        self._shard_rows = [(key, torch.tensor(rows)) for key, rows in groups.items()]
        # |D|^2 of this process's segments never changes: computed once, summed over shards with the other stats each step.
        self._d_sq = [tensor_stats(t.prior, t.prior, segments=t.local)[..., 0].float().to(_local(t.param).device) if t.local else None
                      for t in targets]

    @property
    def num_tensors(self) -> int:
        """Canonical prior tensors bound (each expert of a fused tensor counts once, a LoRA-wrapped weight once)."""
        return sum(c is not None for t in self.targets for c in t.canonicals) + len({t.name for t in self.lora_targets})

    @property
    def num_params(self) -> int:
        """Parameters the bias acts on (for a LoRA target, its trainable factors)."""
        return (sum(t.param.numel() * sum(c is not None for c in t.canonicals) // len(t.canonicals) for t in self.targets)
                + sum(p.numel() for t in self.lora_targets for _, p in t.factors))

    @property
    def num_skipped(self) -> int:
        """Prior tensors left out by ``bind(skip_frozen=True)`` (frozen parameters with no LoRA adapter)."""
        return len(self.skipped)

    @classmethod
    def bind(cls, model: torch.nn.Module, prior: PriorSource, rule: str = "adaptive", alpha: float = 1.0,
             family: str | Family | None = None, prior_device: torch.device | str | None = None,
             skip_frozen: bool = False) -> "DriftBias":
        """Map every prior tensor to its parameter of ``model`` (in-memory names, via the family table).

        Fails with :class:`IncompatibleError` when the prior is empty or names a ``family`` other than the
        model's (the family name is compared, not the key layout: qwen2_vl and qwen2_5_vl share a layout
        but not weights, so D of one means nothing for the other), when a prior tensor finds no parameter,
        a shape differs or the parameter is frozen: a prior is never silently ignored. Each D is read once
        in its stored dtype and placed on its parameter's device (or ``prior_device``), split like the
        parameter when it is an FSDP2 DTensor. MoE experts (one prior tensor per expert) are placed in
        their fused parameter, each expert biased with its own coefficient. ``model`` must be unwrapped
        (not inside DDP).

        ``model`` may be a PEFT model (``PeftModel``) or carry PEFT LoRA layers: names are then mapped as
        before the wrapping, and a prior tensor whose weight is frozen and wrapped by an active LoRA
        adapter biases the adapter's factors (:mod:`deltakit.lora`). Prior tensors on frozen parameters with
        no adapter are an error stating how many, unless ``skip_frozen``: then they are left out (listed in
        :attr:`skipped`) and the log says how many act and how many are skipped.
        """
        check_rule(rule)
        names = list(prior.names)
        if not names:
            raise IncompatibleError("the prior holds no tensor; export one with deltakit prior (check its --modules/--layers)")
        base = base_model_of(model)
        layers = lora_layers(base)
        params = plain_parameters(base, layers) if layers else dict(base.named_parameters())
        fam, _, text = map_parameters(named_view(base, params) if layers else base, family)
        built_for = getattr(prior, "family", None)
        if built_for is not None and built_for != fam.name:
            raise IncompatibleError(
                f"the prior was built for a {built_for} model but this model is {fam.name}; a prior only fits the family it was "
                f"exported against (same key layout is not enough), so export one with deltakit prior --mllm <this model>")
        missing = [n for n in names if n not in text]
        if missing:
            raise IncompatibleError(
                f"prior tensor {missing[0]!r} (and {len(missing) - 1} more) matches no parameter of this {fam.name} model "
                f"(text tower has {len(text)} tensors, e.g. {next(iter(text), 'none')!r}); is the prior from another model?")
        by_param: dict[str, list[str]] = {}
        for n in names:
            part = text[n]
            if tuple(prior.shape(n)) != tuple(part.shape):
                raise IncompatibleError(f"prior tensor {n!r} has shape {tuple(prior.shape(n))} but parameter {part.key!r} "
                                        f"holds it as {tuple(part.shape)}")
            by_param.setdefault(part.key, []).append(n)
        segments: dict[str, list[tuple[str, Part]]] = {}
        for c, part in text.items():
            if part.key in by_param and part.expert is not None:
                segments.setdefault(part.key, []).append((c, part))
        trained, lora, frozen = [], [], []
        for pname, covered in by_param.items():
            if params[pname].requires_grad:
                trained.append((pname, covered))
                continue
            module = pname.removesuffix(".weight")
            found = (lora_targets_of(covered[0], module, layers[module], tuple(prior.shape(covered[0])), float(prior.alpha(covered[0])))
                     if module in layers and pname.endswith(".weight") and pname not in segments else [])
            lora.extend(found)
            if not found:
                frozen.append((pname, covered))
        skipped = [c for _, covered in frozen for c in covered]
        if skipped and not skip_frozen:
            what = "prior tensor targets a frozen parameter" if len(skipped) == 1 else "prior tensors target frozen parameters"
            raise IncompatibleError(
                f"{len(skipped)} {what} with no LoRA adapter "
                f"(e.g. {skipped[0]!r} on frozen parameter {frozen[0][0]!r}); unfreeze them, adapt them with LoRA, drop them from "
                f"the prior, or pass skip_frozen=True (deltakit finetune --skip-frozen) to leave them out")
        if not trained and not lora:
            raise IncompatibleError(f"all {len(skipped)} prior tensors target frozen parameters with no LoRA adapter: nothing to bias")
        targets = []
        for pname, covered in trained:
            p = params[pname]
            device = torch.device(prior_device) if prior_device is not None else _local(p).device
            load_device = p.device_mesh.device_type if isinstance(p, DTensor) else device
            if pname not in segments:
                full, canonicals, alphas = prior.get(covered[0], device=load_device), covered, [float(prior.alpha(covered[0]))]
            else:
                full, canonicals, alphas = _fused_prior(prior, p, set(covered), segments[pname], load_device)
            first, local = 0, len(canonicals)
            if isinstance(p, DTensor):
                d, first, local = _distribute(full, p, len(canonicals))
                d = d.to(device, copy=True)
                del full
            else:
                d = full.clone() if full.device.type == "cpu" and pname not in segments else full
            targets.append(Target(pname, p, d, canonicals, alphas, first, local))
        loaded: dict[str, torch.Tensor] = {}
        for t in lora:
            if t.name not in loaded:
                full = prior.get(t.name, device=torch.device(prior_device) if prior_device is not None else t.a.device)
                loaded[t.name] = full.clone() if full.device.type == "cpu" else full
            t.prior = loaded[t.name]
        bias = cls(targets, rule, alpha, lora)
        bias.skipped = skipped
        log.info("DRIFT prior: %d tensors, %s parameters carry a prior (rule %s, alpha %g, %s)", bias.num_tensors,
                 f"{bias.num_params:,}", rule, alpha, "prior on cpu" if prior_device == "cpu" else "prior on the training device")
        if lora:
            log.info("DRIFT prior: %d of them on frozen weights wrapped by LoRA, biasing %d adapter factors through the "
                     "projected directions s B^T D and s D A^T", len(loaded), sum(len(t.factors) for t in lora))
        if skipped:
            log.info("DRIFT prior: %d prior tensors act, %d skipped (frozen parameters with no LoRA adapter, e.g. %s)",
                     bias.num_tensors, len(skipped), skipped[0])
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
        grads, rows = [], []
        for t, dd in zip(self.targets, self._d_sq):
            if t.param.grad is None:
                raise DeltakitError(f"parameter {t.name!r} carries a prior but got no gradient (is it used in the forward pass?)")
            g = _local(t.param.grad)
            grads.append(g)
            n = len(t.canonicals)
            if n == 1:
                rows.append(tensor_stats(g, t.prior, dd).reshape(1, 3))
                continue
            r = torch.zeros(n, 3, dtype=torch.float64, device=g.device)
            if t.local:
                r[t.first:t.first + t.local] = tensor_stats(g, t.prior, dd, segments=t.local).reshape(-1, 3)
            rows.append(r)
        full_rows = sum(len(t.canonicals) for t in self.targets)
        lora_dirs = self._lora_stats(rows)
        stats = self._sum_over_shards(torch.cat(rows))
        alphas = torch.cat([self._alphas, self._lora_alphas]) if self.lora_targets else self._alphas
        c = coefficients(stats, alphas.to(stats.device), self.rule)
        for g, t, row in zip(grads, self.targets, self._rows):
            d = t.prior if t.prior.device == g.device else t.prior.to(g.device, non_blocking=True)
            if len(t.canonicals) == 1:
                ci = float(c[row])
                if ci != 0.0:
                    g.add_(d, alpha=-ci)
            elif t.local:
                local = c[row + t.first:row + t.first + t.local].to(g.dtype)
                g.view(t.local, -1).addcmul_(d.view(t.local, -1), -local[:, None])
        self._lora_update(c[full_rows:], lora_dirs)
        covered = self._covered.to(stats.device)
        if self.lora_targets:  # a projected direction is 0 where B (or A) is, e.g. D_A at the first step
            covered = torch.cat([covered.bool(), stats[full_rows:, 1] > 0])
        g_norm, d_norm = stats[:, 0].clamp_min(0).sqrt(), stats[:, 1].clamp_min(0).sqrt()
        cos = (stats[:, 2] / (g_norm.clamp_min(EPS) * d_norm.clamp_min(EPS)))[covered]
        ratio = (c.square() * stats[:, 1]).sum().sqrt() / stats[:, 0].sum().sqrt().clamp_min(EPS)
        return DriftStep(cos=float(cos.mean()) if cos.numel() else 0.0, bias_ratio=float(ratio))

    def _lora_stats(self, rows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Append one statistics row per LoRA factor to ``rows``; returns each target's projected directions."""
        out = []
        for t in self.lora_targets:
            dirs = t.directions(t.prior)
            for (which, p), d in zip(t.factors, dirs):
                if p.grad is None:
                    raise DeltakitError(f"LoRA factor {which} of {t.module!r} (adapter {t.adapter!r}) carries a prior but got no gradient")
                rows.append(tensor_stats(p.grad, d).reshape(1, 3))
            out.append(dirs)
        return out

    def _lora_update(self, c: torch.Tensor, dirs: list[list[torch.Tensor]]) -> None:
        """``g -= c D_factor`` on every LoRA factor, with its row of coefficients ``c``."""
        row = 0
        for t, target_dirs in zip(self.lora_targets, dirs):
            for (_, p), d in zip(t.factors, target_dirs):
                ci = float(c[row])
                row += 1
                if ci != 0.0:
                    p.grad.add_(d.to(p.grad.dtype), alpha=-ci)

    def micro_batch_hooks(self) -> list:
        """Bias every micro-batch's local gradient in backward, as the public DRIFT code does (``bias_at: micro_batch``).

        One tensor hook per target parameter: the rule is applied to the gradient of one backward pass,
        before it is added to ``.grad`` and before DDP reduces it, so a step's gradient is
        ``mean over ranks of sum over micro-batches of bias(g_k)``. Whole parameters only: under FSDP2 a
        micro-batch's local gradient exists only unsharded inside FSDP's backward, where the rule would need
        the whole D on every process, so it is refused. Returns the handles; :meth:`micro_batch_step`
        summarises what the hooks did since its last call.
        """
        if any(isinstance(t.param, DTensor) for t in self.targets):
            raise DeltakitError("bias_at micro_batch is not supported under FSDP2 (a micro-batch's local gradient exists only unsharded inside "
                                "FSDP's backward, and biasing it there needs the whole D on every process): use strategy ddp or bias_at step")
        if self.lora_targets:
            raise DeltakitError("bias_at micro_batch biases whole parameters only, not LoRA factors; use bias_at step")
        self._calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def hook(g: torch.Tensor, i: int) -> torch.Tensor | None:
            t, row, n = self.targets[i], self._rows[i], len(self.targets[i].canonicals)
            d = t.prior if t.prior.device == g.device else t.prior.to(g.device, non_blocking=True)
            stats = tensor_stats(g, d, self._d_sq[i], segments=n).reshape(n, 3)
            c = coefficients(stats, self._alphas[row:row + n].to(stats.device), self.rule)
            self._calls.append((stats, c, self._covered[row:row + n]))
            if n == 1:
                return None if float(c[0]) == 0.0 else g.add(d, alpha=-float(c[0]))
            return g.view(n, -1).addcmul(d.view(n, -1), -c.to(g.dtype)[:, None]).view_as(g)

        return [t.param.register_hook(lambda g, i=i: hook(g, i)) for i, t in enumerate(self.targets)]

    def micro_batch_step(self) -> DriftStep:
        """What the :meth:`micro_batch_hooks` did since the last call, pooled over micro-batches (mean cosine, ratio)."""
        calls, self._calls = getattr(self, "_calls", []), []
        if not calls:
            return DriftStep(cos=0.0, bias_ratio=0.0)
        stats, c = torch.cat([s for s, _, _ in calls]), torch.cat([c for _, c, _ in calls])
        covered = torch.cat([m for _, _, m in calls]).to(stats.device)
        g_norm, d_norm = stats[:, 0].clamp_min(0).sqrt(), stats[:, 1].clamp_min(0).sqrt()
        cos = (stats[:, 2] / (g_norm.clamp_min(EPS) * d_norm.clamp_min(EPS)))[covered]
        ratio = (c.square() * stats[:, 1]).sum().sqrt() / stats[:, 0].sum().sqrt().clamp_min(EPS)
        return DriftStep(cos=float(cos.mean()) if cos.numel() else 0.0, bias_ratio=float(ratio))


def _fused_prior(prior: PriorSource, param: torch.Tensor, covered: set[str], parts: list[tuple[str, Part]],
                 device: torch.device | str) -> tuple[torch.Tensor, list[str | None], list[float]]:
    """D of a fused expert parameter, every expert's prior tensor in its place (0 where the prior has none),
    with the canonical name and alpha of each segment, in memory order."""
    parts = sorted(parts, key=lambda cp: (cp[1].expert, cp[1].offset))
    if len(parts) * math.prod(parts[0][1].shape) != param.numel():
        raise IncompatibleError(f"{len(parts)} expert tensors of shape {list(parts[0][1].shape)} do not tile parameter of shape {list(param.shape)}")
    full = None
    canonicals, alphas = [], []
    for c, part in parts:
        if c in covered:
            value = prior.get(c, device=device)
            if full is None:
                full = torch.zeros(tuple(param.shape), dtype=value.dtype, device=device)
            part_of(full, part).copy_(value)
        canonicals.append(c if c in covered else None)
        alphas.append(float(prior.alpha(c)) if c in covered else 0.0)
    return full, canonicals, alphas


def _distribute(full: torch.Tensor, param: DTensor, segments: int) -> tuple[torch.Tensor, int, int]:
    """This process's part of D split like ``param``, and the segments it holds (first, count)."""
    mesh, placements = param.device_mesh, param.placements
    local = distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
    if segments == 1:
        return local, 0, 1
    if any(p.is_shard() and p.dim != 0 for p in placements):
        raise IncompatibleError(f"a fused expert parameter sharded on a dimension other than 0 ({placements}) is not supported; "
                                f"FSDP2's default Shard(0) is")
    rows = distribute_tensor(torch.arange(param.shape[0], device=mesh.device_type), mesh, placements, src_data_rank=None).to_local()
    per_row = segments // param.shape[0]
    return local, int(rows[0]) * per_row if rows.numel() else 0, rows.numel() * per_row
