"""Merge methods as pure tensor functions: tensors in (already in the compute dtype), one tensor out.

Formulas (``x_i`` the models' tensors, ``b`` the base, ``w_i`` weights, ``d_i = x_i - b``):

- :func:`linear`: ``sum w_i x_i`` (divided by ``sum w_i`` when ``normalize``).
- :func:`task_arithmetic`: ``b + lambda * sum w_i d_i`` (divided by ``sum w_i`` when ``normalize``).
- :func:`ties`: each ``d_i`` keeps its ``density_i`` largest-magnitude entries; per entry the sign of
  ``sum w_i d_i`` is elected and only the agreeing ``w_i d_i`` are summed (divided by the sum of their
  weights when ``normalize``, the TIES disjoint mean); ``b + lambda * that``.
- :func:`dare_linear` / :func:`dare_ties`: each ``d_i`` keeps a seeded random ``density_i`` fraction of
  its entries, rescaled by ``1/density_i`` when ``rescale``; then task arithmetic or the TIES sign
  election as above.

Parameter names and defaults follow mergekit; see docs/merge.md for the intended differences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=float(w))
    return out


def _safe_divisor(total: float) -> float:
    return 1.0 if abs(total) < 1e-8 else total


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """``sum w_i x_i``, divided by ``sum w_i`` when ``normalize`` (mergekit ``linear``)."""
    out = _weighted(tensors, weights)
    if normalize:
        out.div_(_safe_divisor(sum(weights)))
    return out


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    lambda_: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """``b + lambda * sum w_i (x_i - b)`` (divided by ``sum w_i`` when ``normalize``)."""
    mixed = _weighted([x - base for x in tensors], weights)
    if normalize:
        mixed.div_(_safe_divisor(sum(weights)))
    return mixed.mul_(lambda_).add_(base)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of exactly ``max(1, int(density * n))`` largest-``|delta|`` entries (all for ``density >= 1``).

    Entries tied with the k-th largest magnitude are taken in row-major order, so the mask is
    deterministic and holds exactly k entries.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    flat = delta.abs().reshape(-1)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(flat == threshold).reshape(-1)[:need]] = True
    return mask.reshape(delta.shape)


def random_mask(shape: Sequence[int], density: float, seed: int) -> torch.Tensor:
    """Seeded Bernoulli(``density``) keep-mask: ``rand < density`` with a generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen) < density


def sign_consensus(deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """TIES sign election: per entry the sign of the (weighted) sum wins (ties go to +); masks of agreeing entries."""
    majority = torch.where(sum(deltas) >= 0, 1.0, -1.0).to(deltas[0].dtype)
    return [torch.sign(d) == majority for d in deltas]


def _sparse_merge(base: torch.Tensor, deltas: list[torch.Tensor], weights: Sequence[float], consensus: bool,
                  lambda_: float, normalize: bool) -> torch.Tensor:
    """Sum the weighted sparse deltas (sign-elected when ``consensus``), normalise, scale, add to ``base``."""
    weighted = [d.mul_(float(w)) for d, w in zip(deltas, weights)]
    if consensus:
        masks = sign_consensus(weighted)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for d, m, w in zip(weighted, masks, weights):
            mixed.add_(d * m)
            divisor.add_(m.to(base.dtype), alpha=float(w))
        divisor[divisor == 0] = 1
    else:
        mixed = sum(weighted)
        divisor = _safe_divisor(sum(weights))
    if normalize:
        mixed = mixed / divisor
    return mixed.mul_(lambda_).add_(base)


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], densities: Sequence[float],
         lambda_: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """TIES-merging: magnitude trim to ``density``, sign election, disjoint (weighted) mean, ``b + lambda * ...``."""
    deltas = []
    for x, rho in zip(tensors, densities):
        d = x - base
        deltas.append(d.mul_(magnitude_mask(d, rho)))
    return _sparse_merge(base, deltas, weights, True, lambda_, normalize)


def _dare_deltas(base: torch.Tensor, tensors: Sequence[torch.Tensor], densities: Sequence[float],
                 seeds: Sequence[int], rescale: bool) -> list[torch.Tensor]:
    deltas = []
    for x, rho, seed in zip(tensors, densities, seeds):
        d = x - base
        if rho < 1:
            d.mul_(random_mask(d.shape, rho, seed))
            if rescale:
                d.div_(rho)
        deltas.append(d)
    return deltas


def dare_linear(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], seeds: Sequence[int], lambda_: float = 1.0, normalize: bool = False,
                rescale: bool = True) -> torch.Tensor:
    """DARE + task arithmetic: seeded random drop to ``density`` (rescaled by ``1/density``), weighted sum."""
    return _sparse_merge(base, _dare_deltas(base, tensors, densities, seeds, rescale), weights, False, lambda_, normalize)


def dare_ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
              densities: Sequence[float], seeds: Sequence[int], lambda_: float = 1.0, normalize: bool = False,
              rescale: bool = True) -> torch.Tensor:
    """DARE + TIES sign election: seeded random drop (rescaled by ``1/density``), sign consensus, sum."""
    return _sparse_merge(base, _dare_deltas(base, tensors, densities, seeds, rescale), weights, True, lambda_, normalize)
