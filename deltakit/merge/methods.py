"""Merge methods as tensor kernels: the inputs' row blocks (already in the compute dtype) in, merged rows out.

A :class:`Kernel` merges one tensor. A row-local method computes each row block on its own
(:meth:`Kernel.rows`); a method that needs a whole-tensor statistic first (TIES's k-th magnitude, SLERP's
angle, Model Stock's cosines, SCE's variance top-k and weights, DARE/DELLA's L1 rescale) scans the
tensor's row blocks in order (:meth:`Kernel.observe`, repeated while :meth:`Kernel.scanning`), then
writes its rows. ``deltakit.merge.config.METHODS`` names each method's kernel class and options; the
streaming driver (``deltakit.merge.run``) and :func:`merge_tensor` (the whole tensor as one block, the
form the tests and property checks use) are the only callers. Statistics are summed in float64
(``deltakit.engine.sums``), rows are computed in the compute dtype with mergekit's order of operations.

Notation: ``x_i`` the models' tensors, ``b`` the base, ``w_i`` weights, ``d_i = x_i - b``. Formulas and
their differences from mergekit 0.1.5 are in docs/merge.md.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from deltakit.engine import fused
from deltakit.engine.sums import dot64
from deltakit.errors import DeltakitError

Tensors = Sequence[torch.Tensor]


# -- small pieces -----------------------------------------------------------------------------------------
def _deltas(base: torch.Tensor, tensors: Tensors) -> Tensors:
    """``d_i = x_i - b``: one stacked tensor when ``tensors`` is one (the engine's reads), else a list."""
    return tensors - base if isinstance(tensors, torch.Tensor) else [x - base for x in tensors]


def _safe_divisor(total: float) -> float:
    return 1.0 if abs(total) < 1e-8 else total


def _divisor(weights: Sequence[float], normalize: bool, dtype: torch.dtype) -> float:
    """What a ``normalize``d weighted sum is divided by, as mergekit takes ``sum w_i`` for inputs of ``dtype``: the
    weights summed in float64 for float64, else in float32; 1 when below 1e-8 in magnitude, or without ``normalize``."""
    if not normalize:
        return 1.0
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return _safe_divisor(float(torch.tensor([float(w) for w in weights], dtype=wide).sum()))


def _count(flag: torch.Tensor) -> int:
    """Number of ones in a 0/1 float mask (a float32 sum is exact below 2**24 entries)."""
    return int(flag.sum() if flag.numel() < 1 << 24 else flag.sum(dtype=torch.float64))


def linear(tensors: Tensors, weights: Sequence[float], normalize: bool = True, *, dtype: torch.dtype | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``sum w_i x_i``, divided by ``sum w_i`` when ``normalize`` (mergekit ``linear``), computed in ``dtype``
    (default: the inputs') and returned in ``out_dtype``: the first product, then each next one added in one rounding,
    as mergekit's ``addcmul_`` (:func:`deltakit.engine.fused.combine`)."""
    divisor = _divisor(weights, normalize, dtype or tensors[0].dtype)
    return fused.combine(tensors, weights, divisor=divisor, fma=True, dtype=dtype, out_dtype=out_dtype)


def task_arithmetic(base: torch.Tensor, tensors: Tensors, weights: Sequence[float],
                    lambda_: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """``b + lambda * sum w_i (x_i - b)`` (divided by ``sum w_i`` when ``normalize``)."""
    n = len(tensors)
    return fused.sparse_combine(tensors, weights, base=base, masks=[None] * n, factors=[None] * n, consensus=False,
                                normalize=normalize, divisor=_safe_divisor(sum(weights)), scale=lambda_)


def _elected(deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """mergekit's ``get_mask(method="sum")``: 0/1 masks of the entries whose sign is that of ``sum d_i`` (0 counts as +)."""
    total = fused.left_sum([deltas[0].clone(), *deltas[1:]])
    up = fused.flag(torch.ge, total, 0.0)
    return [torch.where(up.bool(), fused.flag(torch.gt, d, 0.0), fused.flag(torch.lt, d, 0.0)) for d in deltas]


# -- exact streamed top-k ----------------------------------------------------------------------------------
class TopK:
    """Exact top-k of a non-negative tensor (a magnitude, a variance) streamed in row-major blocks, without sorting it.

    A sample brackets the k-th largest value in ``[lo, hi]``; one scan over the blocks (:meth:`observe`)
    counts the entries above ``hi`` and keeps the few inside the bracket, from which :meth:`finish`
    reads the exact threshold ``t`` (a missed bracket widens and asks for another scan). :meth:`keep`
    then keeps ``a > t`` plus the first entries equal to ``t`` in row-major order (:meth:`rewind` before
    each ordered sweep), so exactly ``k`` entries are kept: ``max(1, int(density * n))`` by default
    (mergekit's TIES count), or ``k`` as given, or with ``of_nonzero`` ``int(density * nonzero)`` (SCE's
    count, known after the first scan). mergekit's sort leaves the order of tied entries unspecified.
    """

    SAMPLE = 1 << 16

    def __init__(self, sample: torch.Tensor, numel: int, density: float = 1.0, *, k: int | None = None,
                 of_nonzero: bool = False):
        s = torch.sort(sample.reshape(-1).float()).values
        self.numel, self.density, self.of_nonzero = numel, density, of_nonzero
        if of_nonzero:
            k = int(density * numel * (float((s != 0).float().mean()) if len(s) else 1.0))
        elif k is None:
            k = numel if density >= 1 else (max(1, int(density * numel)) if numel else 0)
        self.k = min(max(k, 0), numel)
        self.everything = self.k >= numel and not of_nonzero
        self.nothing = self.k == 0 and not of_nonzero
        self.threshold: float | None = None
        self._quota = self._quota0 = 0
        self._all_equal = True
        self._nonzero = 0
        self._scans = 0
        q = 1 - self.k / max(numel, 1)
        pos = q * (len(s) - 1)
        margin = 6 * (q * (1 - q) * len(s)) ** 0.5 + 2
        self.lo = float(s[max(0, int(pos - margin))]) if len(s) else 0.0
        self.hi = float(s[min(len(s) - 1, int(pos + margin) + 1)]) if len(s) else float("inf")
        self._reset()

    @property
    def done(self) -> bool:
        return self.everything or self.nothing or self.threshold is not None

    def _reset(self) -> None:
        self._above = 0
        self._inside: list[torch.Tensor] = []
        self._n_inside = 0

    def observe(self, a: torch.Tensor) -> None:
        """Count one block (blocks in any order, each once per scan)."""
        if self.of_nonzero and self._scans == 0:
            self._nonzero += _count(fused.flag(torch.ne, a, 0.0))
        self._above += _count(fused.flag(torch.gt, a, self.hi))
        if self.lo == self.hi:
            self._n_inside += _count(fused.flag(torch.eq, a, self.hi))
        else:
            inside = a[fused.flag(torch.ge, a, self.lo).mul_(fused.flag(torch.le, a, self.hi)).bool()]
            self._inside.append(inside)
            self._n_inside += inside.numel()

    def finish(self) -> bool:
        """Resolve the threshold after a scan; False (bracket widened) if another scan is needed."""
        self._scans += 1
        if self.of_nonzero and self._scans == 1:
            self.k = int(self.density * self._nonzero)
            if self.k == 0:
                self.nothing = True
                return True
            if self.k >= self.numel:
                self.everything = True
                return True
        rank = self.k - self._above  # the k-th largest is the rank-th largest inside [lo, hi]
        if 0 < rank <= self._n_inside:
            if self.lo == self.hi:
                t, gt, eq = self.hi, self._above, self._n_inside
            else:
                inside = torch.cat(self._inside)
                t = float(torch.kthvalue(inside, inside.numel() - rank + 1).values)
                gt, eq = self._above + int((inside > t).sum()), int((inside == t).sum())
            self.threshold = t
            self._quota = self._quota0 = self.k - gt
            self._all_equal = self._quota == eq
            self._inside = []
            return True
        if rank > 0 and self.lo <= 0.0:  # [0, hi] and above hi saw every non-NaN entry, and fewer than k
            raise DeltakitError("cannot trim a delta with NaN entries (are the inputs finite?)")
        self.lo, self.hi = (self.hi, float("inf")) if rank <= 0 else (0.0, self.lo)
        self._reset()
        return False

    def rewind(self) -> None:
        """Start a new row-major sweep of :meth:`keep` (the entries tied at the threshold are counted again)."""
        self._quota = self._quota0

    def keep(self, a: torch.Tensor) -> torch.Tensor | None:
        """0/1 keep-mask (``a``'s dtype) of the next block in row-major order (None: keep all)."""
        if self.everything:
            return None
        if self.nothing:
            return torch.zeros_like(a)
        if self._all_equal:
            return fused.flag(torch.ge, a, self.threshold)
        keep = fused.flag(torch.gt, a, self.threshold)
        if self._quota > 0:
            eq = fused.flag(torch.eq, a, self.threshold)
            n = _count(eq)
            if n <= self._quota:
                keep.add_(eq)
                self._quota -= n
            else:
                first = torch.nonzero(eq.reshape(-1)).reshape(-1)[: self._quota]
                keep.reshape(-1)[first] = 1
                self._quota = 0
        return keep


SAMPLE_RUNS, SAMPLE_RUN_ROWS = 32, 32


def sample_runs(rows: int) -> list[tuple[int, int]]:
    """The row ranges a sample reads: all rows up to 1024, else 32 evenly spaced runs of 32 consecutive rows.

    Runs rather than single rows keep a streamed sample to 32 reads per input (1024 single-row reads
    cost more than the scan they prepare on a 0.5B merge); the positions depend only on the row count.
    """
    if rows <= SAMPLE_RUNS * SAMPLE_RUN_ROWS:
        return [(0, rows)]
    starts = torch.linspace(0, rows - SAMPLE_RUN_ROWS, SAMPLE_RUNS).round().long().tolist()
    return [(a, a + SAMPLE_RUN_ROWS) for a in starts]


def sample(read: Callable[[int, int], torch.Tensor], shape: Sequence[int], size: int = TopK.SAMPLE) -> torch.Tensor:
    """About ``size`` entries of a tensor of ``shape``: the rows of :func:`sample_runs`, strided within each row.

    ``read(a, b)`` returns rows ``[a, b)`` (a memory-mapped tensor's slice, or a streamed read that may
    reuse its buffer: the sample is copied out). Deterministic for a shape, so two tensors of one shape are
    sampled at the same positions and deltas of samples are samples of deltas; touching few rows keeps
    the page faults (and resident memory) of sampling a memory-mapped tensor small.
    """
    if len(shape) < 2:
        flat = read(0, shape[0] if shape else 1).reshape(-1)
        return flat[:: max(1, flat.numel() // size)].clone()
    runs = sample_runs(shape[0])
    cols = math.prod(shape[1:])
    step = max(1, cols // max(1, size // sum(b - a for a, b in runs)))
    return torch.cat([read(a, b).reshape(b - a, cols)[:, ::step].clone() for a, b in runs])


# -- seeded randomness -------------------------------------------------------------------------------------
DARE_BLOCK = 1 << 20


def dare_block_rows(shape: Sequence[int]) -> int:
    """Rows per random block: the uniforms of rows ``[j*R, (j+1)*R)`` are drawn with seed ``seed + j``."""
    return max(1, DARE_BLOCK // math.prod(shape[1:]))


def uniform(shape: Sequence[int], seed: int, first_row: int = 0) -> torch.Tensor:
    """Seeded float32 uniforms in [0, 1) for rows ``[first_row, first_row + shape[0])`` of a tensor.

    Rows are cut in fixed blocks of :func:`dare_block_rows`; block ``j`` is ``torch.rand(block shape)``
    from a generator seeded ``seed + j``, so the draw does not depend on how the work is chunked or
    threaded (``first_row`` must start a block).
    """
    shape = tuple(shape)
    if not shape:
        return fused.uniform(1, seed).reshape(())
    rows = dare_block_rows(shape)
    if first_row % rows:
        raise ValueError(f"first_row {first_row} does not start a DARE block of {rows} rows")
    cols = math.prod(shape[1:])
    parts = [fused.uniform(min(rows, shape[0] - start) * cols, seed + (first_row + start) // rows)
             for start in range(0, shape[0], rows)]
    return (torch.cat(parts) if len(parts) > 1 else parts[0]).reshape(shape)


def random_mask(shape: Sequence[int], density: float, seed: int, first_row: int = 0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded Bernoulli(``density``) 0/1 keep-mask: ``uniform(...) < density`` (see :func:`uniform`)."""
    return uniform(shape, seed, first_row).lt_(density).to(dtype)


# -- kernels -----------------------------------------------------------------------------------------------
class Kernel(ABC):
    """The merge of one tensor of shape ``shape`` with resolved parameters ``p``.

    ``p`` holds shared parameters as scalars and per-model ones as lists (one per non-base model);
    ``seeds`` are the per-model seeds of a method that draws random masks. A kernel whose
    :meth:`scanning` is true before its first row is written gets every row block in order through
    :meth:`observe` (and :meth:`end_scan` after each scan) until it is false; with ``sample`` set it first
    gets samples of the inputs at the same positions (:meth:`prepare`). Row blocks start at row
    ``start``; a kernel that scans is used by one thread, a row-local one by many (it keeps no state).

    ``dtype`` is the compute dtype (``None``: the inputs'); :meth:`rows` may return ``out_dtype`` (what it is cast to
    anyway). A kernel that is :attr:`fused` computes only with :mod:`deltakit.engine.fused`, so the engine may hand
    it its inputs as stored (bfloat16 rows for a float32 merge) instead of converted.
    """

    sample = False
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None

    def __init__(self, p: dict[str, Any], shape: Sequence[int], models: int, seeds: Sequence[int] = ()):
        self.p, self.shape, self.models, self.seeds = p, tuple(shape), models, list(seeds)
        self.numel = math.prod(self.shape)

    def prepare(self, base: torch.Tensor | None, tensors: Tensors) -> None:
        """Samples of the base and the tensors (same positions) before the first scan."""

    def scanning(self) -> bool:
        """Whether another statistic scan over the row blocks is needed before the rows are written."""
        return False

    def observe(self, start: int, base: torch.Tensor | None, tensors: Tensors) -> None:
        """One row block of a statistic scan; only called while :meth:`scanning` is true, so a kernel that
        scans defines it."""
        raise TypeError(f"{type(self).__name__} says it is scanning but has no observe()")

    def end_scan(self) -> None:
        """Called after each complete scan."""

    @abstractmethod
    def rows(self, start: int, base: torch.Tensor | None, tensors: Tensors) -> torch.Tensor:
        """The merged rows ``[start, start + len)`` (a new tensor in the compute dtype or ``out_dtype``)."""

    @property
    def fused(self) -> bool:
        """Whether :meth:`observe` and :meth:`rows` compute only with :mod:`deltakit.engine.fused` (any input dtype)."""
        return False

    def combine(self, inputs: Tensors, weights: Sequence[float], **kw: Any) -> torch.Tensor:
        """:func:`deltakit.engine.fused.combine` in this kernel's compute dtype, returned in its ``out_dtype``."""
        return fused.combine(inputs, weights, dtype=self.dtype, out_dtype=self.out_dtype, **kw)


class Linear(Kernel):
    """``linear`` (and ``layer_swap``, whose first layers get the MLLM's weight 1): :func:`linear`."""

    fused = True

    def rows(self, start, base, tensors):
        return linear(tensors, self.p["weight"], self.p["normalize"], dtype=self.dtype, out_dtype=self.out_dtype)


class TaskArithmetic(Kernel):
    """mergekit's generalized task arithmetic: each ``d_i`` sparsified (``sparsify``), optionally rescaled to
    its L1 norm (``rescale``), weighted, mixed (sum, or the TIES sign election with ``consensus``), ``b + lambda * mix``.

    ``sparsify``: None (task arithmetic), ``"magnitude"`` (TIES: the ``max(1, int(density n))`` largest
    ``|d|``), ``"outliers"`` (Breadcrumbs: of ``|d|`` sorted ascending, ranks ``[n_bot, n_bot + int(density n))``
    with ``n_bot = max(0, n - int(density n) - int(gamma n))``: the largest ``gamma`` fraction and the
    smallest dropped), ``"random"`` (DARE: Bernoulli(``density``)), ``"della"`` (DELLA: Bernoulli of a probability
    rising with the magnitude's rank in its row, :func:`deltakit.engine.fused.sparse_mask`). A model with ``density >= 1`` is not sparsified (nor rescaled).
    ``rescale`` multiplies a sparsified delta by ``|d|_1 / |masked d|_1`` over the whole tensor (left
    as is when either is below 1e-7), as mergekit 0.1.5.
    """

    def __init__(self, p, shape, models, seeds=(), sparsify: str | None = None, consensus: bool = False):
        super().__init__(p, shape, models, seeds)
        self.consensus = consensus
        n = models
        densities = p.get("density", [1.0] * n)
        self.active = [sparsify is not None and rho < 1 for rho in densities]
        self.sparsify = sparsify
        self.sample = sparsify in ("magnitude", "outliers") and any(self.active)
        self.tops: list[list[TopK]] = [[] for _ in range(n)]
        self.rescale = bool(p.get("rescale", False)) and any(self.active)
        self.l1 = [[0.0, 0.0] for _ in range(n)]
        self.factor: list[float | None] = [None] * n
        self._dtype = torch.float32
        self._drawn: dict[tuple[int, int], torch.Tensor] = {}  # random masks of the L1 scan, as bits, for the rows
        self._phase = "topk" if self.sample else ("l1" if self.rescale else "rows")
        if sparsify == "della":
            for rho, eps in zip(densities, p["epsilon"]):
                if rho < 1 and not (0 < rho - eps and rho + eps < 1):
                    raise DeltakitError(f"della: epsilon {eps:g} with density {rho:g}: density +/- epsilon must lie in (0, 1)")

    def prepare(self, base, tensors):
        for i, (x, rho) in enumerate(zip(tensors, self.p["density"])):
            if not self.active[i]:
                continue
            s = (x - base).abs_()
            if self.sparsify == "magnitude":
                self.tops[i] = [TopK(s, self.numel, rho)]
            else:  # keep top (n - n_bot) minus top (n - n_bot - target): ranks [n_bot, n_bot + target) ascending
                target, top = int(rho * self.numel), int(self.p["gamma"][i] * self.numel)
                bottom = max(0, self.numel - target - top)
                self.tops[i] = [TopK(s, self.numel, k=self.numel - bottom), TopK(s, self.numel, k=self.numel - bottom - target)]

    def scanning(self):
        return self._phase != "rows"

    def observe(self, start, base, tensors):
        for i, x in enumerate(tensors):
            if not self.active[i]:
                continue
            if self._phase == "topk":
                a = (x - base).abs_()
                for top in self.tops[i]:
                    if not top.done:
                        top.observe(a)
            else:
                self._dtype = self.dtype or x.dtype
                bits, before, after = self._keep(i, start, base, x, sums=True)
                self.l1[i][0] += before
                self.l1[i][1] += after
                if self.sparsify in ("random", "della"):  # drawn once: kept as bits (1/32 of the block) for the rows
                    self._drawn[(i, start)] = bits

    def end_scan(self):
        if self._phase == "topk":
            for tops in self.tops:
                for top in tops:
                    if not top.done:
                        top.finish()
            if all(top.done for tops in self.tops for top in tops):
                self._phase = "l1" if self.rescale else "rows"
        elif self._phase == "l1":
            for i, (before, after) in enumerate(self.l1):
                if self.active[i]:
                    # mergekit divides the two sums in the compute dtype
                    ratio = torch.tensor(before, dtype=self._dtype) / torch.tensor(after, dtype=self._dtype)
                    self.factor[i] = None if before < 1e-7 or after < 1e-7 else float(ratio)
            self._phase = "rows"
        for tops in self.tops:
            for top in tops:
                top.rewind()

    def _keep(self, i: int, start: int, base: torch.Tensor, x: torch.Tensor, sums: bool = False) -> tuple[torch.Tensor, float, float]:
        """Model ``i``'s keep mask on the rows from ``start`` as :func:`deltakit.engine.fused.pack`'s bits, with the sums of
        ``|d|`` and of the kept ``|d|``: DARE's and DELLA's in float64 (:func:`deltakit.engine.fused.sparse_mask`); TIES's
        and Breadcrumbs's (0 unless ``sums``) torch's float32 sums, as mergekit's (the same bits on a one-block tensor)."""
        rho = self.p["density"][i]
        if self.sparsify in ("random", "della"):
            epsilon = self.p["epsilon"][i] if self.sparsify == "della" else None
            u = uniform(x.shape, self.seeds[i], start)
            return fused.sparse_mask(x, base, u, rho, epsilon=epsilon, row=x.shape[-1] if x.dim() else 1)
        a = (x - base).abs_()
        if self.sparsify == "magnitude":
            keep = self.tops[i][0].keep(a)
            keep = torch.ones_like(a) if keep is None else keep
        else:
            keep, drop = (top.keep(a) for top in self.tops[i])
            keep = (torch.ones_like(a) if keep is None else keep).sub_(torch.ones_like(a) if drop is None else drop)
        if not sums:
            return fused.pack(keep), 0.0, 0.0
        return fused.pack(keep), float(a.sum()), float((a * keep).sum())

    def _mask(self, i: int, start: int, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model ``i``'s keep bits for the rows: those drawn in the L1 scan, else :meth:`_keep`'s."""
        bits = self._drawn.pop((i, start), None)
        return self._keep(i, start, base, x)[0] if bits is None else bits

    @property
    def fused(self):
        return self.sparsify in ("random", "della") or (not any(self.active) and not self.consensus)

    def rows(self, start, base, tensors):
        weights = self.p["weight"]
        if not any(self.active) and not self.consensus:
            divisor = _divisor(weights, self.p["normalize"], self.dtype or tensors[0].dtype)
            return self.combine(tensors, weights, base=base, divisor=divisor, scale=self.p["lambda"])
        masks = [self._mask(i, start, base, x) if self.active[i] else None for i, x in enumerate(tensors)]
        return fused.sparse_combine(tensors, weights, base=base, masks=masks, factors=self.factor, consensus=self.consensus,
                                    normalize=self.p["normalize"], divisor=_safe_divisor(sum(weights)),
                                    scale=self.p["lambda"], dtype=self.dtype, out_dtype=self.out_dtype)


class _Gram(Kernel):
    """A kernel whose statistic is the Gram matrix ``<v_i, v_j>`` (float64) of its vectors (:meth:`vectors`) over the tensor."""

    def __init__(self, p, shape, models, seeds=()):
        super().__init__(p, shape, models, seeds)
        self.gram: torch.Tensor | None = None
        self._scanned = False

    def vectors(self, base: torch.Tensor | None, tensors: Tensors) -> tuple[Tensors, torch.Tensor | None]:
        """The Gram matrix's vectors as (inputs, base): ``x_i - b`` of the inputs with a base, else the inputs."""
        return tensors, base

    def scanning(self):
        return not self._scanned

    def observe(self, start, base, tensors):
        inputs, b = self.vectors(base, tensors)
        g = fused.gram(inputs, base=b)
        self.gram = g if self.gram is None else self.gram.add_(g)

    def end_scan(self):
        self._scanned = True
        self.solve(self.gram)

    def solve(self, gram: torch.Tensor) -> None:
        """Turn the Gram matrix into the coefficients the rows need."""


class Slerp(_Gram):
    """mergekit ``slerp``: spherical interpolation from the base ``a`` (t = 0) to the other model ``b`` (t = 1),
    over the whole tensor: ``cos = <a, b> / (|a| |b|)`` (norms <= 1e-8 count as 1); ``(1 - t) a + t b`` when
    ``|cos| > 0.9995``, else ``sin((1-t) theta) / sin theta * a + sin(t theta) / sin theta * b``."""

    fused = True

    def vectors(self, base, tensors):
        return [tensors[0], base], None

    def solve(self, g):
        t = float(self.p["t"])
        na, nb = (math.sqrt(float(g[i, i])) for i in (1, 0))
        na, nb = (n if n > 1e-8 else 1.0 for n in (na, nb))
        dot = max(-1.0, min(1.0, float(g[0, 1]) / (na * nb)))
        if abs(dot) > 0.9995:
            self.coef = (1 - t, t)
        else:
            theta = math.acos(dot)
            self.coef = (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))

    def rows(self, start, base, tensors):
        return self.combine([base, tensors[0]], self.coef)  # mergekit's s0 * a + s1 * b


def _nuslerp_coefs(t: float, dot: torch.Tensor, n0: torch.Tensor, n1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's ``nuslerp`` of vectors with dot products ``dot`` and norms ``n0``, ``n1``, as the coefficients
    ``(c0, c1)`` of ``c0 v0 + c1 v1``: ``sin((1-t) theta) / sin theta`` and ``sin(t theta) / sin theta``, or
    ``1 - t`` and ``t`` where the vectors are colinear (``1 - cos^2 <= 1e-16``)."""
    cos = (dot / (n0.clamp(min=1e-7) * n1.clamp(min=1e-7))).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    s = torch.where(colinear, 1, torch.sin(theta))
    return (torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / s),
            torch.where(colinear, t, torch.sin(t * theta) / s))


class NuSlerp(Kernel):
    """mergekit ``nuslerp``: SLERP of two models (or of their deltas from an optional base, added back) with
    ``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to 0), over the whole tensor (``nuslerp_flatten``, the
    default), each row (last dimension), or each column (``nuslerp_row_wise``: vectors along dimension 0).
    Near-colinear vectors (``1 - cos^2 <= 1e-16``) interpolate linearly; the output is *not* renormalised."""

    def __init__(self, p, shape, models, seeds=()):
        super().__init__(p, shape, models, seeds)
        w0, w1 = p["weight"]
        self.t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        self.mode = "flat" if p["nuslerp_flatten"] else ("columns" if p["nuslerp_row_wise"] else "rows")
        self._acc: torch.Tensor | None = None
        self._stats: list[torch.Tensor] | None = None

    @property
    def fused(self):
        return self.mode == "flat"

    def _pair(self, base, tensors):
        v = tensors if base is None else _deltas(base, tensors[:2])
        return v[0], v[1]

    def scanning(self):
        return self.mode != "rows" and self._stats is None

    def observe(self, start, base, tensors):
        if self.mode == "flat":
            g = fused.gram(tensors[:2], base=base)
            part = torch.stack([g[0, 1], g[0, 0], g[1, 1]])
        else:  # per column (dimension 0 summed)
            v0, v1 = self._pair(base, tensors)
            part = torch.stack([(v0 * v1).double().sum(0), (v0 * v0).double().sum(0), (v1 * v1).double().sum(0)])
        self._acc = part if self._acc is None else self._acc.add_(part)

    def end_scan(self):
        dot, s0, s1 = self._acc
        self._stats = _nuslerp_coefs(self.t, dot, s0.sqrt(), s1.sqrt())

    def rows(self, start, base, tensors):
        if self.mode == "flat":  # c0 v0 + c1 v1 (+ b) as one weighted sum of the inputs
            c0, c1 = (float(c) for c in self._stats)
            if base is None:
                return self.combine(tensors[:2], [c0, c1], fma=True)
            return self.combine([tensors[0], tensors[1], base], [c0, c1, 1 - c0 - c1], fma=True)
        v0, v1 = self._pair(base, tensors)
        if self.mode == "rows":
            a, b = (v.reshape(-1, v.shape[-1] if v.dim() else 1) for v in (v0, v1))
            c0, c1 = _nuslerp_coefs(self.t, (a * b).sum(-1, keepdim=True), a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True))
            out = (c0 * a).add_(c1 * b).reshape(v0.shape)
        else:
            c0, c1 = (c.to(v0.dtype) for c in self._stats)
            out = (c0 * v0).add_(c1 * v1)
        return out if base is None else out.add_(base)


class MultiSlerp(_Gram):
    """mergekit ``multislerp``: the weighted mean direction of the unit tensors (or unit deltas from an optional
    base), scaled to the weighted mean norm: ``sum w_i |v_i| * m / |m|`` with ``m = sum w_i v_i / (|v_i| + eps)``
    (weights divided by their sum with ``normalize_weights``). mergekit's tangent-space step adds
    ``sum w_i (u_i - <u_i, m^> m^) = m - |m| m^ = 0``, so it changes nothing but rounding (docs/merge.md).
    One model: that model; ``|m| < eps``: two models interpolate linearly, more are an error."""

    def solve(self, g):
        w = torch.tensor(self.p["weight"], dtype=torch.float64)
        if self.p["normalize_weights"]:
            w = w / w.sum()
        eps = float(self.p["eps"])
        norms = g.diagonal().clamp(min=0).sqrt()
        c = w / (norms + eps)
        mean_norm = math.sqrt(max(0.0, float(c @ g @ c)))
        if mean_norm < eps:
            if len(w) != 2:
                raise DeltakitError("multislerp: the weighted sum of the unit tensors is zero (antipodal inputs with "
                                    "balancing weights); use different weights")
            self.coef = w.tolist()
        else:
            self.coef = (c * (float((norms * w).sum()) / mean_norm)).tolist()

    fused = True

    def scanning(self):
        return self.models > 1 and super().scanning()

    def rows(self, start, base, tensors):
        if len(tensors) == 1:
            return self.combine(tensors, [1.0])
        return self.combine(tensors, self.coef, base=base, fma=True)


class Karcher(_Gram):
    """mergekit ``karcher``: the equal-weight Karcher (Riemannian) mean of the unit tensors on the sphere, by
    mergekit's fixed-point iteration (``max_iter``, ``tol``), scaled by the mean norm. Every iterate lies in the
    span of the inputs, so the iteration runs on their Gram matrix (coefficients, not tensors): one statistic
    scan, then each row block is a weighted sum of the inputs. Norms ``<= tol`` leave the mean (not the scale)."""

    fused = True

    def vectors(self, base, tensors):
        return tensors, None

    def scanning(self):
        return self.models > 1 and super().scanning()

    def solve(self, g):
        n, tol = g.shape[0], float(self.p["tol"])
        norms = g.diagonal().clamp(min=0).sqrt()
        valid = [i for i in range(n) if float(norms[i]) > tol]
        self.coef = [0.0] * n
        if not valid:
            return
        idx = torch.tensor(valid)
        gu = g[idx][:, idx] / torch.outer(norms[idx], norms[idx])  # Gram matrix of the unit tensors
        alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)

        def norm(c: torch.Tensor) -> float:
            return math.sqrt(max(0.0, float(c @ gu @ c)))

        mean = alpha.clone()
        mn = norm(mean)
        if mn < tol:  # the units cancel: start from the first
            mean = torch.zeros_like(alpha)
            mean[0] = 1.0
        else:
            mean = mean / mn
        for _ in range(int(self.p["max_iter"])):
            tangent = torch.zeros_like(mean)
            dots = (gu @ mean).clamp(-1.0, 1.0)
            for j in range(len(valid)):
                theta = math.acos(float(dots[j]))
                if theta < tol:
                    continue
                e = torch.zeros_like(mean)
                e[j] = 1.0
                tangent += alpha[j] * (theta / math.sin(theta)) * (e - dots[j] * mean)
            tn = norm(tangent)
            if tn < tol:
                break
            mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
            un = norm(mean)
            if un > tol:
                mean = mean / un
        scale = float(norms.sum()) / n
        for k, i in enumerate(valid):
            self.coef[i] = scale * float(mean[k]) / float(norms[i])

    def rows(self, start, base, tensors):
        if len(tensors) == 1:
            return self.combine(tensors, [1.0])
        return self.combine(tensors, self.coef, fma=True)


def _model_stock_t(cos: torch.Tensor, count: int) -> torch.Tensor:
    """Model Stock's interpolation ratio ``t = N cos / (1 + (N - 1) cos)`` (0 where the denominator vanishes)."""
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, torch.ones_like(denominator), denominator))


class ModelStock(_Gram):
    """mergekit ``model_stock``: ``t * mean(x_i) + (1 - t) * b`` with ``t = N cos / (1 + (N - 1) cos)``, ``cos``
    the mean pairwise cosine of the deltas ``d_i`` (each clamped to [-1, 1], norms' product clamped at 1e-6),
    over the whole tensor, or per row (last dimension) with ``filter_wise``."""

    @property
    def fused(self):
        return not self.p["filter_wise"]

    def scanning(self):
        return not self.p["filter_wise"] and super().scanning()

    def solve(self, g):
        n = g.shape[0]
        norms = g.diagonal().clamp(min=0).sqrt()
        cos = [max(-1.0, min(1.0, float(g[i, j]) / max(float(norms[i] * norms[j]), 1e-6))) for i in range(n) for j in range(i + 1, n)]
        self.t = float(_model_stock_t(torch.tensor(sum(cos) / len(cos), dtype=torch.float64), n))

    def rows(self, start, base, tensors):
        n = len(tensors)
        if not self.p["filter_wise"]:  # t mean(x_i) + (1 - t) b as one weighted sum of the inputs
            return self.combine([*tensors, base], [self.t / n] * n + [1 - self.t], fma=True)
        average = fused.left_sum([tensors[0].clone(), *tensors[1:]]).div_(n)
        shape = base.shape
        b = base.reshape(-1, shape[-1] if base.dim() else 1)
        d = [x.reshape(b.shape) - b for x in tensors]
        cos = torch.stack([((d[i] * d[j]).sum(-1) / (d[i].norm(dim=-1) * d[j].norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
                           for i in range(n) for j in range(i + 1, n)]).mean(0).unsqueeze(-1)
        t = _model_stock_t(cos, n)
        return (t * average.reshape(b.shape) + (1 - t) * b).reshape(shape)


class NearSwap(Kernel):
    """mergekit ``nearswap``: per entry ``w = clamp(t / max(|b - x|, 1e-6), 0, 1)``, ``w x + (1 - w) b``: the other
    model's value where it is within ``t`` of the base, moving toward the base as they differ more."""

    fused = True

    def rows(self, start, base, tensors):
        return fused.nearswap(tensors[0], base, self.p["t"], dtype=self.dtype, out_dtype=self.out_dtype)


class Sce(Kernel):
    """mergekit ``sce`` (select, calculate, erase): with ``select_topk < 1`` keep the ``int(select_topk * nonzero)``
    entries of largest variance across the deltas (one mask for all); weight each masked ``d_i`` by its mean
    square over the tensor (normalised; uniform when they sum below 1e-6); erase the terms against the elected
    sign; ``b + sum w_i e_i d_i / max(sum w_i e_i, 1e-6)``."""

    sample = True

    def __init__(self, p, shape, models, seeds=()):
        super().__init__(p, shape, models, seeds)
        self.top: TopK | None = None
        self.squares = [0.0] * models
        self._phase = "topk" if p["select_topk"] < 1 else "squares"
        self.weights: list[float] = []

    @staticmethod
    def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
        """Population variance across the models per entry, two-pass (``torch.var`` over a stacked first dimension
        is a slow strided reduction on the CPU: 20x this)."""
        mean = fused.left_sum([deltas[0].clone(), *deltas[1:]]).div_(len(deltas))
        return fused.left_sum([(d - mean).square_() for d in deltas]).div_(len(deltas))

    def prepare(self, base, tensors):
        if self._phase == "topk":
            self.top = TopK(self._variance(_deltas(base, tensors)), self.numel, self.p["select_topk"], of_nonzero=True)

    def scanning(self):
        return self._phase != "rows"

    def _masked(self, base, tensors) -> list[torch.Tensor]:
        d = _deltas(base, tensors)
        if self.top is not None:
            keep = self.top.keep(self._variance(d))
            if keep is not None:
                d = [x.mul_(keep) for x in d]
        return d

    def observe(self, start, base, tensors):
        if self._phase == "topk":
            self.top.observe(self._variance(_deltas(base, tensors)))
        else:
            for i, d in enumerate(self._masked(base, tensors)):
                self.squares[i] += dot64(d, d)

    def end_scan(self):
        if self._phase == "topk":
            if self.top.finish():
                self._phase = "squares"
        else:
            means = [s / max(self.numel, 1) for s in self.squares]
            total = sum(means)
            self.weights = [1.0 / len(means)] * len(means) if abs(total) < 1e-6 else [m / total for m in means]
            self._phase = "rows"
        if self.top is not None:
            self.top.rewind()

    def rows(self, start, base, tensors):
        d = self._masked(base, tensors)
        erased = [e.mul_(w) for e, w in zip(_elected(d), self.weights)]
        merged = fused.left_sum(x * e for x, e in zip(d, erased))
        return merged.div_(fused.left_sum([erased[0].clone(), *erased[1:]]).clamp_(min=1e-6)).add_(base)


# -- the whole tensor as one block -------------------------------------------------------------------------
def _sample_whole(t: torch.Tensor) -> torch.Tensor:
    """:func:`sample` of a tensor in memory."""
    rows = t.reshape(-1) if t.dim() < 2 else t
    return sample(lambda a, b: rows[a:b], t.shape)


def run_kernel(kernel: Kernel, base: torch.Tensor | None, tensors: Tensors) -> torch.Tensor:
    """Run ``kernel`` on whole tensors as one block (prepare with samples, scans, rows)."""
    if kernel.sample:
        kernel.prepare(None if base is None else _sample_whole(base), [_sample_whole(x) for x in tensors])
    while kernel.scanning():
        kernel.observe(0, base, tensors)
        kernel.end_scan()
    return kernel.rows(0, base, tensors)


def merge_tensor(method: str, base: torch.Tensor | None, tensors: Tensors, seeds: Sequence[int] = (),
                 **parameters: Any) -> torch.Tensor:
    """Merge whole tensors with ``method`` (a name in ``METHODS``): per-model parameters as lists, shared ones as
    scalars, the method's defaults for the rest (``lambda_`` for ``lambda``); ``seeds`` (one per model) for the
    methods that draw random masks (default ``0, 1, ...``)."""
    from deltakit.merge.config import METHODS

    spec = METHODS[method]
    p: dict[str, Any] = {k.rstrip("_"): v for k, v in parameters.items()}
    for name, default in spec.shared_params.items():
        p.setdefault(name, default)
    for name, default in spec.model_params.items():
        value = p.get(name, default)
        p[name] = [float(v) for v in value] if isinstance(value, (list, tuple)) else [value] * len(tensors)
    missing = [k for k, v in p.items() if v is None or (isinstance(v, list) and None in v)]
    if missing:
        raise TypeError(f"{method}: missing parameter(s) {', '.join(missing)}")
    kernel = spec.kernel(p, tuple(tensors[0].shape), len(tensors), list(seeds) or list(range(len(tensors))))
    return run_kernel(kernel, base, tensors)
