"""Fused float32 kernels over stored rows: a weighted sum of inputs, their Gram matrix and nearswap, in one pass over memory.

:func:`combine`, :func:`gram` and :func:`nearswap` take row blocks as stored, bfloat16 or float32, straight from the reader's
buffers. They run the C kernels of ``_fused.c``, which is built with the package. ctypes releases the GIL for
the call, so the engine's threads run them in parallel. Each kernel converts its inputs in tiles that stay in
cache, so a block is one pass over memory instead of one pass per torch operation.

Where the extension is not built (no C compiler at install), or for another dtype, the same arithmetic runs
as torch operations:
- :func:`combine` and :func:`nearswap` give the same bits either way: one IEEE rounding per operation, in
  mergekit's order;
- :func:`gram` gives the same values to float64 rounding.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

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
