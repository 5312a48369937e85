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

import math
from collections.abc import Iterable, Sequence

import torch

from deltakit.errors import DeltakitError


def _weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum w_i x_i`` into a new tensor (the inputs may be read-only mapped views)."""
    out = torch.mul(tensors[0], float(weights[0]))
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=float(w))
    return out


def _scaled(t: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``t * lambda`` in place (skipped for 1, which changes nothing)."""
    return t if lambda_ == 1 else t.mul_(lambda_)


def _safe_divisor(total: float) -> float:
    return 1.0 if abs(total) < 1e-8 else total


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """``sum w_i x_i``, divided by ``sum w_i`` when ``normalize`` (mergekit ``linear``)."""
    out = _weighted(tensors, weights)
    divisor = _safe_divisor(sum(weights))
    if normalize and divisor != 1.0:
        out.div_(divisor)
    return out


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    lambda_: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """``b + lambda * sum w_i (x_i - b)`` (divided by ``sum w_i`` when ``normalize``)."""
    mixed = _weighted([x - base for x in tensors], weights)
    if normalize:
        mixed.div_(_safe_divisor(sum(weights)))
    return _scaled(mixed, lambda_).add_(base)


def _flag(op, x: torch.Tensor, value: float) -> torch.Tensor:
    """``op(x, value)`` as 0/1 in ``x``'s dtype (a float mask: much faster to build and apply than a bool one)."""
    return op(x, value, out=torch.empty_like(x))


def _count(flag: torch.Tensor) -> int:
    """Number of ones in a 0/1 float mask (a float32 sum is exact below 2**24 entries)."""
    return int(flag.sum() if flag.numel() < 1 << 24 else flag.sum(dtype=torch.float64))


class TopK:
    """Exact magnitude top-k of a tensor streamed in row-major blocks, without sorting it.

    A sample of ``|delta|`` brackets the k-th largest magnitude in ``[lo, hi]``; one scan over the blocks
    (:meth:`observe`) counts the entries above ``hi`` and keeps the few inside the bracket, from which
    :meth:`finish` reads the exact threshold ``t`` (a missed bracket widens and asks for another scan).
    :meth:`keep` then keeps ``|delta| > t`` plus the first entries equal to ``t`` in row-major order, so
    exactly ``k = max(1, int(density * n))`` entries are kept (mergekit's count; its tie order is unspecified).
    """

    SAMPLE = 1 << 16

    def __init__(self, sample: torch.Tensor, numel: int, density: float):
        self.k = numel if density >= 1 else (max(1, int(density * numel)) if numel else 0)
        self.everything = self.k >= numel
        self.threshold: float | None = None
        self._quota = 0
        self._all_equal = True
        s = torch.sort(sample.reshape(-1).float().abs()).values
        q = 1 - self.k / max(numel, 1)
        pos = q * (len(s) - 1)
        margin = 6 * (q * (1 - q) * len(s)) ** 0.5 + 2
        self.lo = float(s[max(0, int(pos - margin))]) if len(s) else 0.0
        self.hi = float(s[min(len(s) - 1, int(pos + margin) + 1)]) if len(s) else float("inf")
        self._reset()

    @property
    def done(self) -> bool:
        return self.everything or self.threshold is not None

    def _reset(self) -> None:
        self._above = 0
        self._inside: list[torch.Tensor] = []
        self._n_inside = 0

    def observe(self, a: torch.Tensor) -> None:
        """Count one block of ``|delta|`` (blocks in any order, each once per scan)."""
        self._above += _count(_flag(torch.gt, a, self.hi))
        if self.lo == self.hi:
            self._n_inside += _count(_flag(torch.eq, a, self.hi))
        else:
            inside = a[_flag(torch.ge, a, self.lo).mul_(_flag(torch.le, a, self.hi)).bool()]
            self._inside.append(inside)
            self._n_inside += inside.numel()

    def finish(self) -> bool:
        """Resolve the threshold after a scan; False (bracket widened) if another scan is needed."""
        rank = self.k - self._above  # the k-th largest is the rank-th largest inside [lo, hi]
        if 0 < rank <= self._n_inside:
            if self.lo == self.hi:
                t, gt, eq = self.hi, self._above, self._n_inside
            else:
                inside = torch.cat(self._inside)
                t = float(torch.kthvalue(inside, inside.numel() - rank + 1).values)
                gt, eq = self._above + int((inside > t).sum()), int((inside == t).sum())
            self.threshold = t
            self._quota = self.k - gt
            self._all_equal = self._quota == eq
            self._inside = []
            return True
        if rank > 0 and self.lo <= 0.0:  # [0, hi] and above hi saw every non-NaN entry, and fewer than k
            raise DeltakitError("cannot trim a delta with NaN entries (are the inputs finite?)")
        self.lo, self.hi = (self.hi, float("inf")) if rank <= 0 else (0.0, self.lo)
        self._reset()
        return False

    def keep(self, a: torch.Tensor) -> torch.Tensor | None:
        """0/1 keep-mask (``a``'s dtype) of the next block of ``|delta|`` in row-major order (None: keep all)."""
        if self.everything:
            return None
        if self._all_equal:
            return _flag(torch.ge, a, self.threshold)
        keep = _flag(torch.gt, a, self.threshold)
        if self._quota > 0:
            eq = _flag(torch.eq, a, self.threshold)
            n = _count(eq)
            if n <= self._quota:
                keep.add_(eq)
                self._quota -= n
            else:
                first = torch.nonzero(eq.reshape(-1)).reshape(-1)[: self._quota]
                keep.reshape(-1)[first] = 1
                self._quota = 0
        return keep


def sample(t: torch.Tensor, size: int = TopK.SAMPLE) -> torch.Tensor:
    """About ``size`` entries of ``t`` from at most 1024 evenly spaced rows, strided within each row.

    Deterministic for a shape, so two tensors of one shape are sampled at the same positions; touching
    few rows keeps the page faults (and resident memory) of sampling a memory-mapped tensor small.
    """
    if t.dim() < 2:
        flat = t.reshape(-1)
        return flat[:: max(1, flat.numel() // size)]
    rows = t.reshape(t.shape[0], -1)
    picked = rows[torch.linspace(0, rows.shape[0] - 1, min(rows.shape[0], 1024)).round().long()]
    per_row = max(1, size // picked.shape[0])
    return picked[:, :: max(1, rows.shape[1] // per_row)]


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of exactly ``max(1, int(density * n))`` largest-``|delta|`` entries (all for ``density >= 1``).

    Entries tied with the k-th largest magnitude are taken in row-major order.
    """
    a = delta.abs()
    top = TopK(sample(a), a.numel(), density)
    while not top.done:
        top.observe(a)
        top.finish()
    keep = top.keep(a)
    return torch.ones_like(a, dtype=torch.bool) if keep is None else keep.bool()


DARE_BLOCK = 1 << 20


def dare_block_rows(shape: Sequence[int]) -> int:
    """Rows per DARE random block: the mask of rows ``[j*R, (j+1)*R)`` is drawn with seed ``seed + j``."""
    return max(1, DARE_BLOCK // math.prod(shape[1:]))


def random_mask(shape: Sequence[int], density: float, seed: int, first_row: int = 0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded Bernoulli(``density``) 0/1 keep-mask for rows ``[first_row, first_row + shape[0])`` of a tensor.

    Rows are cut in fixed blocks of :func:`dare_block_rows`; block ``j`` is ``rand < density`` with
    ``rand = torch.rand(block shape)`` from a generator seeded ``seed + j``, so the mask does not depend on
    how the work is chunked or threaded (``first_row`` must start a block).
    """
    shape = tuple(shape)
    if not shape:
        return torch.rand((), generator=torch.Generator().manual_seed(seed)).lt_(density).to(dtype)
    rows = dare_block_rows(shape)
    if first_row % rows:
        raise ValueError(f"first_row {first_row} does not start a DARE block of {rows} rows")
    parts = []
    for start in range(0, shape[0], rows):
        gen = torch.Generator().manual_seed(seed + (first_row + start) // rows)
        parts.append(torch.rand((min(rows, shape[0] - start), *shape[1:]), generator=gen).lt_(density))
    mask = torch.cat(parts) if len(parts) > 1 else parts[0]
    return mask.to(dtype)


def _sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Left-to-right sum into the first (fresh) tensor."""
    it = iter(tensors)
    out = next(it)
    for t in it:
        out.add_(t)
    return out


def combine(base: torch.Tensor, deltas: list[torch.Tensor], weights: Sequence[float], consensus: bool,
            lambda_: float, normalize: bool) -> torch.Tensor:
    """``base + lambda * mix(w_i d_i)`` for sparsified deltas (modified in place).

    Without ``consensus`` the mix is the sum (divided by ``sum w_i`` when ``normalize``); with it, per
    entry the sign of ``sum w_i d_i`` is elected (ties go to +) and only the non-zero terms of that sign
    are summed (divided by the sum of their weights when ``normalize``: the TIES disjoint mean). The
    operations and their order match mergekit's, so results agree to the bit; the election is written
    with 0/1 float masks (sum of the positive parts where + wins, of the negative parts elsewhere).
    """
    weighted = [d.mul_(float(w)) for d, w in zip(deltas, weights)]
    total = _sum([weighted[0].clone() if len(weighted) > 1 else weighted[0], *weighted[1:]])
    if not consensus:
        if normalize:
            total.div_(_safe_divisor(sum(weights)))
        return _scaled(total, lambda_).add_(base)
    up, down = _flag(torch.ge, total, 0.0), _flag(torch.lt, total, 0.0)
    pos = _sum(d.clamp(min=0) for d in weighted)
    neg = _sum(d.clamp(max=0) for d in weighted)
    mixed = pos.mul_(up).add_(neg.mul_(down))
    if normalize:
        w_pos = _sum(_flag(torch.gt, d, 0.0).mul_(float(w)) for d, w in zip(weighted, weights))
        w_neg = _sum(_flag(torch.lt, d, 0.0).mul_(float(w)) for d, w in zip(weighted, weights))
        divisor = w_pos.mul_(up).add_(w_neg.mul_(down))
        mixed.div_(divisor.add_(_flag(torch.eq, divisor, 0.0)))
    return _scaled(mixed, lambda_).add_(base)


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], densities: Sequence[float],
         lambda_: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """TIES-merging: magnitude trim to ``density``, sign election, disjoint (weighted) mean, ``b + lambda * ...``."""
    deltas = []
    for x, rho in zip(tensors, densities):
        d = x - base
        deltas.append(d.mul_(magnitude_mask(d, rho)))
    return combine(base, deltas, weights, True, lambda_, normalize)


def _dare_deltas(base: torch.Tensor, tensors: Sequence[torch.Tensor], densities: Sequence[float],
                 seeds: Sequence[int], rescale: bool, first_row: int) -> list[torch.Tensor]:
    deltas = []
    for x, rho, seed in zip(tensors, densities, seeds):
        d = x - base
        if rho < 1:
            d.mul_(random_mask(d.shape, rho, seed, first_row, d.dtype))
            if rescale:
                d.div_(rho)
        deltas.append(d)
    return deltas


def dare_linear(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], seeds: Sequence[int], lambda_: float = 1.0, normalize: bool = False,
                rescale: bool = True, first_row: int = 0) -> torch.Tensor:
    """DARE + task arithmetic: seeded random drop to ``density`` (rescaled by ``1/density``), weighted sum.

    ``first_row`` says where these rows sit in the full tensor (see :func:`random_mask`).
    """
    deltas = _dare_deltas(base, tensors, densities, seeds, rescale, first_row)
    return combine(base, deltas, weights, False, lambda_, normalize)


def dare_ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
              densities: Sequence[float], seeds: Sequence[int], lambda_: float = 1.0, normalize: bool = False,
              rescale: bool = True, first_row: int = 0) -> torch.Tensor:
    """DARE + TIES sign election: seeded random drop (rescaled by ``1/density``), sign consensus, sum."""
    deltas = _dare_deltas(base, tensors, densities, seeds, rescale, first_row)
    return combine(base, deltas, weights, True, lambda_, normalize)
