"""Fused float32 kernels over stored rows: a weighted sum of inputs, their Gram matrix, nearswap, and the sparsified sums of
TIES, DARE and DELLA, in one pass over memory.

:func:`combine`, :func:`gram`, :func:`nearswap`, :func:`sparse_mask` and :func:`sparse_combine` take row blocks as stored,
bfloat16 or float32, straight from the reader's buffers; :func:`uniform` is torch's seeded ``torch.rand``. They run the C kernels of ``_fused.c``, which is built with the package. ctypes releases the GIL for
the call, so the engine's threads run them in parallel. Each kernel converts its inputs in tiles that stay in
cache, so a block is one pass over memory instead of one pass per torch operation.

Where the extension is not built (no C compiler at install), or for another dtype, the same arithmetic runs
as torch operations:
- :func:`combine`, :func:`nearswap`, :func:`sparse_combine`, :func:`uniform` and the masks of :func:`sparse_mask` give the
  same bits either way: one IEEE rounding per operation, in mergekit's order;
- the float64 sums of :func:`sparse_mask` agree to float64 rounding;
- :func:`gram` gives the same values to float64 rounding.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable, Sequence

import numpy as np

import torch

from deltakit.engine.sums import gram64

_CODES = {torch.float32: 0, torch.bfloat16: 1}
_P = ctypes.c_void_p


@functools.cache
def native() -> ctypes.CDLL | None:
    """The built C kernels, or ``None`` where the extension was not built."""
    try:
        from deltakit.engine import _fused
    except ImportError:
        return None
    lib = ctypes.CDLL(_fused.__file__)
    lib.dk_combine.argtypes = [ctypes.c_int, ctypes.POINTER(_P), ctypes.POINTER(ctypes.c_float), _P, ctypes.c_int,
                               ctypes.c_float, ctypes.c_float, ctypes.c_int, _P, ctypes.c_int, ctypes.c_int64]
    lib.dk_combine.restype = None
    lib.dk_gram.argtypes = [ctypes.c_int, ctypes.POINTER(_P), _P, ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_double)]
    lib.dk_gram.restype = None
    lib.dk_nearswap.argtypes = [_P, _P, ctypes.c_int, ctypes.c_float, _P, ctypes.c_int, ctypes.c_int64]
    lib.dk_nearswap.restype = None
    lib.dk_uniform.argtypes = [ctypes.c_uint64, ctypes.c_int64, _P]
    lib.dk_uniform.restype = None
    lib.dk_sparse_mask.argtypes = [_P, _P, ctypes.c_int, _P, ctypes.c_float, ctypes.c_int, ctypes.c_double, ctypes.c_double,
                                   ctypes.c_int64, ctypes.c_int64, _P, ctypes.POINTER(ctypes.c_double)]
    lib.dk_sparse_mask.restype = ctypes.c_int
    lib.dk_sparse_combine.argtypes = [ctypes.c_int, ctypes.POINTER(_P), ctypes.POINTER(ctypes.c_float),
                                      ctypes.POINTER(ctypes.c_float), ctypes.POINTER(_P), _P, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_float, ctypes.c_float, _P, ctypes.c_int, ctypes.c_int64]
    lib.dk_sparse_combine.restype = None
    lib.dk_max_inputs.restype = ctypes.c_int
    lib.max_inputs = lib.dk_max_inputs()
    return lib


def reads(dtype: torch.dtype | None) -> bool:
    """Whether the C kernels take inputs stored in ``dtype`` (the engine then hands them over unconverted)."""
    return dtype in _CODES and native() is not None


def _native_inputs(inputs: Sequence[torch.Tensor], base: torch.Tensor | None) -> ctypes.CDLL | None:
    """The C kernels when they take ``inputs`` and ``base`` (contiguous, of one size and one dtype they read, at most
    ``max_inputs`` inputs), else ``None``."""
    lib = native()
    first = inputs[0]
    if lib is None or first.dtype not in _CODES or len(inputs) > lib.max_inputs:
        return None
    tensors = [*inputs, *([base] if base is not None else [])]
    if all(t.dtype == first.dtype and t.is_contiguous() and t.numel() == first.numel() and t.device.type == "cpu" for t in tensors):
        return lib
    return None


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (_P * len(tensors))(*(t.data_ptr() for t in tensors))


def combine(inputs: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor | None = None,
            divisor: float = 1.0, scale: float = 1.0, fma: bool = False, dtype: torch.dtype | None = None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(sum_i w_i x_i) / divisor * scale``; with a ``base`` b, ``b + (sum_i w_i (x_i - b)) / divisor * scale``.

    Computed in ``dtype`` (default: the inputs'), with one rounding per operation in this order: each
    difference, each product, the sum left to right (mergekit's ``(weights * tensors).sum(0)``), the division,
    the scaling, the base added back. With ``fma`` each product after the first is added in one rounding
    (torch's ``add_(x, alpha=w)``, mergekit's ``addcmul_``). Returned in ``out_dtype`` (default ``dtype``) as a
    new tensor of the first input's shape.
    """
    dtype = dtype or inputs[0].dtype
    out_dtype = out_dtype or dtype
    lib = _native_inputs(inputs, base) if dtype == torch.float32 and out_dtype in _CODES else None
    if lib is not None:
        out = torch.empty(inputs[0].shape, dtype=out_dtype)
        lib.dk_combine(len(inputs), _pointers(inputs), (ctypes.c_float * len(weights))(*weights),
                       None if base is None else base.data_ptr(), _CODES[inputs[0].dtype], divisor, scale,
                       int(fma), out.data_ptr(), _CODES[out_dtype], out.numel())
        return out
    b = None if base is None else base.to(dtype)
    acc = None
    for x, w in zip(inputs, weights):
        v = x.to(dtype)
        v = v if b is None else v - b
        if acc is None:
            acc = torch.mul(v, float(w))
        else:
            acc.add_(v, alpha=float(w)) if fma else acc.add_(torch.mul(v, float(w)))
    if divisor != 1:
        acc.div_(divisor)
    if scale != 1:
        acc.mul_(scale)
    if b is not None:
        acc.add_(b)
    return acc.to(out_dtype)


def nearswap(x: torch.Tensor, base: torch.Tensor, t: float, *, dtype: torch.dtype | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """mergekit's ``nearswap`` of ``x`` toward ``base``: ``w x + (1 - w) b`` with ``w = clamp(t / max(|b - x|, 1e-6), 0, 1)``,
    computed in ``dtype`` (default: the inputs') as mergekit's torch operations round it (``t / d`` is ``t * (1 / d)``),
    returned in ``out_dtype`` (default ``dtype``)."""
    dtype = dtype or x.dtype
    out_dtype = out_dtype or dtype
    lib = _native_inputs([x], base) if dtype == torch.float32 and out_dtype in _CODES else None
    if lib is not None:
        out = torch.empty(x.shape, dtype=out_dtype)
        lib.dk_nearswap(x.data_ptr(), base.data_ptr(), _CODES[x.dtype], t, out.data_ptr(), _CODES[out_dtype], out.numel())
        return out
    v, b = x.to(dtype), base.to(dtype)
    weight = (t / (b - v).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return (weight * v).add_((1 - weight).mul_(b)).to(out_dtype)


def gram(inputs: Sequence[torch.Tensor], *, base: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 ``[n, n]`` Gram matrix ``<v_i, v_j>`` of ``v_i = x_i`` or, with a ``base``, ``x_i - b``.

    The C kernel takes the differences in float32 and the products and sums in float64. The torch path
    (:func:`~deltakit.engine.sums.gram64`) takes them within ``2e-7 |v_i| |v_j|``.
    """
    lib = _native_inputs(inputs, base)
    if lib is not None:
        n = len(inputs)
        out = torch.zeros(n, n, dtype=torch.float64)
        lib.dk_gram(n, _pointers(inputs), None if base is None else base.data_ptr(), _CODES[inputs[0].dtype],
                    inputs[0].numel(), ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_double)))
        return out
    wide = [x if x.dtype in (torch.float32, torch.float64) else x.float() for x in inputs]
    if base is None:
        return gram64(wide)
    b = base if base.dtype in (torch.float32, torch.float64) else base.float()
    return gram64([x - b for x in wide])


def uniform(count: int, seed: int) -> torch.Tensor:
    """``torch.rand(count, generator=torch.Generator().manual_seed(seed))``, float32 in [0, 1): torch's CPU Mersenne
    Twister and its 24-bit uniforms, written out in C (several times faster than torch's serial kernel)."""
    lib = native()
    if lib is None:
        return torch.rand(count, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(count, dtype=torch.float32)
    lib.dk_uniform(seed % (1 << 64), count, out.data_ptr())
    return out


def pack(keep: torch.Tensor) -> torch.Tensor:
    """A keep mask (bool or 0/1) as bits: entry ``k`` of the flattened mask is bit ``k % 8`` of byte ``k // 8``."""
    return torch.from_numpy(np.packbits(keep.to(torch.bool).numpy().reshape(-1), bitorder="little"))


def unpack(bits: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` entries of :func:`pack`'s bits as a bool tensor."""
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=count, bitorder="little").view(np.bool_))


def stable_ranks(a: torch.Tensor) -> torch.Tensor:
    """Each entry's rank along the last dimension of ``a`` (0 = smallest; equal values in order of position), int64."""
    order = torch.sort(a, dim=-1, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(a.shape[-1]).expand_as(order))


def sparse_mask(x: torch.Tensor, base: torch.Tensor, u: torch.Tensor, density: float, *, epsilon: float | None = None,
                row: int = 1) -> tuple[torch.Tensor, float, float]:
    """The random keep mask of the delta ``d = x - base`` (float32, or float64 for float64 inputs) as :func:`pack`'s bits, with the float64 sums of
    ``|d|`` and of the kept ``|d|``.

    ``u`` holds one float32 uniform per entry. DARE (no ``epsilon``): keep where ``u < density``. DELLA: along each row
    of ``row`` entries (the last dimension), keep where ``(u - density + epsilon) / c < r`` in float64
    (``c = 2 epsilon / max(row - 1, 1)``), ``r`` the entry's stable rank by ``|d|`` in its row (0 = smallest): that is
    ``u < density - epsilon + c r``, a keep probability rising with the magnitude.
    """
    count = x.numel()
    if count % row:
        raise ValueError(f"{count} entries are not rows of {row}")
    lo, step = density - (epsilon or 0.0), 2 * (epsilon or 0.0) / max(row - 1, 1)
    takes_u = u.dtype == torch.float32 and u.is_contiguous() and u.numel() == count and u.device.type == "cpu"
    lib = _native_inputs([x], base) if takes_u else None
    if lib is not None:
        bits = torch.empty((count + 7) // 8, dtype=torch.uint8)
        sums = (ctypes.c_double * 2)(0.0, 0.0)
        if lib.dk_sparse_mask(x.data_ptr(), base.data_ptr(), _CODES[x.dtype], u.data_ptr(), density, int(epsilon is not None),
                              lo, step, row, count, bits.data_ptr(), sums):
            raise MemoryError(f"no memory for a DELLA row of {row} entries")
        return bits, sums[0], sums[1]
    wide = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    a = (x.to(wide) - base.to(wide)).abs_().reshape(-1, row)
    u = u.reshape(a.shape)
    if epsilon is None:
        keep = u.to(wide) < density
    else:
        keep = u.double().sub_(lo).div_(step) < stable_ranks(a)
    return pack(keep), float(a.sum(dtype=torch.float64)), float((a * keep).sum(dtype=torch.float64))


def sparse_combine(inputs: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor,
                   masks: Sequence[torch.Tensor | None], factors: Sequence[float | None], consensus: bool, normalize: bool,
                   divisor: float = 1.0, scale: float = 1.0, dtype: torch.dtype | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``b + scale * mix(w_i d_i)`` of the sparsified deltas ``d_i = (x_i - b) * keep_i * factor_i`` (TIES, DARE, DELLA, Breadcrumbs).

    ``masks`` are :func:`pack`'s bits (``None``: all kept), ``factors`` the rescale factors (``None``: 1). Without
    ``consensus`` the mix is the sum left to right (divided by ``divisor`` when ``normalize``); with it, per entry the
    sign of ``sum w_i d_i`` is elected (ties go to +) and only the non-zero terms of that sign are summed (divided by the
    sum of their weights when ``normalize``: the TIES disjoint mean). Computed in ``dtype`` (default: the inputs') with
    one rounding per operation in mergekit's order (the election as 0/1 float masks: the sum of the positive parts where
    + wins, of the negative parts elsewhere), so both paths give the same bits; returned in ``out_dtype``.
    """
    dtype = dtype or inputs[0].dtype
    out_dtype = out_dtype or dtype
    count = inputs[0].numel()
    lib = _native_inputs(inputs, base) if dtype == torch.float32 and out_dtype in _CODES else None
    if lib is not None:
        n = len(inputs)
        out = torch.empty(inputs[0].shape, dtype=out_dtype)
        lib.dk_sparse_combine(n, _pointers(inputs), (ctypes.c_float * n)(*weights),
                              (ctypes.c_float * n)(*(1.0 if f is None else f for f in factors)),
                              (_P * n)(*(None if m is None else m.data_ptr() for m in masks)), base.data_ptr(),
                              _CODES[inputs[0].dtype], int(consensus), int(normalize), divisor, scale, out.data_ptr(),
                              _CODES[out_dtype], count)
        return out
    b = base.to(dtype)
    weighted = []
    for x, w, keep, factor in zip(inputs, weights, masks, factors):
        d = x.to(dtype) - b
        if keep is not None:
            d.mul_(unpack(keep, count).reshape(d.shape).to(dtype))
        if factor is not None:
            d.mul_(factor)
        weighted.append(d.mul_(float(w)))
    total = left_sum([weighted[0].clone() if len(weighted) > 1 else weighted[0], *weighted[1:]])
    if not consensus:
        if normalize:
            total.div_(divisor)
    else:
        up, down = flag(torch.ge, total, 0.0), flag(torch.lt, total, 0.0)
        mixed = left_sum(d.clamp(min=0) for d in weighted).mul_(up).add_(left_sum(d.clamp(max=0) for d in weighted).mul_(down))
        if normalize:
            w_pos = left_sum(flag(torch.gt, d, 0.0).mul_(float(w)) for d, w in zip(weighted, weights))
            w_neg = left_sum(flag(torch.lt, d, 0.0).mul_(float(w)) for d, w in zip(weighted, weights))
            div = w_pos.mul_(up).add_(w_neg.mul_(down))
            mixed.div_(div.add_(flag(torch.eq, div, 0.0)))
        total = mixed
    if scale != 1:
        total.mul_(scale)
    return total.add_(b).to(out_dtype)


def flag(op, x: torch.Tensor, value: float) -> torch.Tensor:
    """``op(x, value)`` as 0/1 in ``x``'s dtype (a float mask: much faster to build and apply than a bool one)."""
    return op(x, value, out=torch.empty_like(x))


def left_sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Left-to-right sum into the first (fresh) tensor."""
    it = iter(tensors)
    out = next(it)
    for t in it:
        out.add_(t)
    return out
