"""How a prior tensor D is stored: one :class:`Encoding` entry per storage format.

An entry names the parts it stores (file keys ``"<canonical name>:<part>"``; ``full`` stores the name
itself), lays them out for a tensor (:attr:`Encoding.specs`), encodes D into them, expands them back to a
dense float32 D (what :meth:`deltakit.prior.Prior.get` returns), checks stored shapes, and says how the
engine streams it: ``rows`` encodings encode each row block independently (exported block by block),
the others need the whole tensor (one engine unit per tensor). Adding a format is one entry in
:data:`ENCODINGS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import scipy.linalg
import torch

from deltakit.errors import DeltakitError
from deltakit.io.writer import TensorSpec


class PriorError(DeltakitError):
    """A prior file, or an export request, that cannot be used as asked."""


@dataclass(frozen=True)
class Compression:
    """What the user asked for: ``lowrank`` (rank), ``topk`` (fraction) or ``int8``; None means full tensors."""

    method: str
    rank: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, spec: str | None) -> "Compression | None":
        """``lowrank:R``, ``topk:F`` (0 < F <= 1) or ``int8``; None or ``none`` for no compression."""
        if spec is None or spec == "none":
            return None
        method, _, arg = spec.partition(":")
        try:
            if method == "lowrank" and int(arg) >= 1:
                return cls("lowrank", rank=int(arg))
            if method == "topk" and 0 < float(arg) <= 1:
                return cls("topk", fraction=float(arg))
        except ValueError:
            pass
        if method == "int8" and not arg:
            return cls("int8")
        raise PriorError(f"bad compression {spec!r}; use lowrank:R (R >= 1), topk:F (0 < F <= 1) or int8")

    def encoding(self, shape: tuple[int, ...]) -> str:
        """The encoding of one tensor: low rank applies to matrices only, 1-D tensors stay full."""
        return "full" if self.method == "lowrank" and len(shape) != 2 else self.method

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **({"rank": self.rank} if self.rank else {}),
                **({"fraction": self.fraction} if self.fraction else {})}

    def __str__(self) -> str:
        if self.method == "lowrank":
            return f"lowrank:{self.rank}"
        return f"topk:{self.fraction:g}" if self.method == "topk" else self.method


Parts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Encoding:
    """One storage format of D.

    ``specs(name, shape, dtype, comp)`` lays out the stored parts; ``encode(d, specs, comp)`` turns a float32
    D (a row block when ``rows``, else the whole tensor) into parts keyed by part name; ``expand(parts,
    shape)`` rebuilds dense float32; ``fits(part_shapes, shape)`` checks a file's stored shapes.
    """

    name: str
    parts: tuple[str, ...]
    rows: bool
    specs: Callable[[str, tuple[int, ...], torch.dtype, Compression | None], list[TensorSpec]]
    encode: Callable[[torch.Tensor, dict[str, TensorSpec], Compression | None], Parts]
    expand: Callable[[Parts, tuple[int, ...]], torch.Tensor]
    fits: Callable[[dict[str, tuple[int, ...]], tuple[int, ...]], bool]

    def key(self, name: str, part: str) -> str:
        """The file key of one stored part of tensor ``name``."""
        return f"{name}:{part}" if part else name


# -- the math (pure tensor functions) ------------------------------------------------------------

def top_eigenvectors(gram: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading eigenvectors (columns, largest first) of a symmetric PSD matrix, in float64.

    Only those are computed (LAPACK ``syevr`` through scipy), which makes the truncated SVD below several
    times cheaper than a full SVD of the matrix.
    """
    n = gram.shape[0]
    _, vecs = scipy.linalg.eigh(gram.double().numpy(), subset_by_index=[n - r, n - 1], driver="evr")
    return torch.from_numpy(vecs[:, ::-1].copy())


def lowrank(d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation ``u @ v`` of a matrix (the truncated SVD), as float32 factors.

    With ``V_r``/``U_r`` the leading right/left singular vectors (eigenvectors of ``D^T D`` or ``D D^T``,
    whichever is smaller): a tall matrix gives ``(D V_r, V_r^T)``, a wide one ``(U_r, U_r^T D)``.
    """
    m, n = d.shape
    r = min(rank, m, n)
    d = d.float()
    if m >= n:
        v = top_eigenvectors(d.T @ d, r).float()
        return d @ v, v.T.contiguous()
    u = top_eigenvectors(d @ d.T, r).float()
    return u, u.T @ d


def topk_count(numel: int, fraction: float) -> int:
    """How many entries ``topk:fraction`` keeps of a tensor of ``numel`` entries (at least one)."""
    return min(numel, max(1, math.ceil(fraction * numel)))


def topk(d: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk_count`` largest-magnitude entries of ``d``: ascending flat indices and their values."""
    flat = d.reshape(-1)
    mag = flat.abs()
    k = topk_count(flat.numel(), fraction)
    threshold = torch.kthvalue(mag, flat.numel() - k + 1).values
    keep = mag > threshold
    short = k - int(keep.sum())
    if short:  # ties at the threshold: the first ones in row-major order
        keep[(mag == threshold).nonzero().squeeze(1)[:short]] = True
    idx = keep.nonzero().squeeze(1)
    return idx, flat[idx]


def int8_quantize(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: ``q = round(d / s)`` with ``s = max|row| / 127`` (a 1-D tensor is one row)."""
    rows = d.reshape(1 if d.dim() < 2 else d.shape[0], -1).float()
    scale = rows.abs().amax(dim=1) / 127
    q = torch.round(rows / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8).reshape(d.shape), scale


# -- the entries ---------------------------------------------------------------------------------

def _full_encode(d: torch.Tensor, specs: dict[str, TensorSpec], comp: Compression | None) -> Parts:
    return {"": d.to(specs[""].dtype)}


def _int8_specs(name: str, shape: tuple[int, ...], dtype: torch.dtype, comp: Compression | None) -> list[TensorSpec]:
    rows = 1 if len(shape) < 2 else shape[0]
    return [TensorSpec(f"{name}:q", torch.int8, shape), TensorSpec(f"{name}:scale", torch.float32, (rows,))]


def _int8_encode(d: torch.Tensor, specs: dict[str, TensorSpec], comp: Compression | None) -> Parts:
    q, scale = int8_quantize(d)
    return {"q": q, "scale": scale}


def _int8_expand(parts: Parts, shape: tuple[int, ...]) -> torch.Tensor:
    q = parts["q"].float()
    return (q.reshape(parts["scale"].shape[0], -1) * parts["scale"].float()[:, None]).reshape(shape)


def _topk_specs(name: str, shape: tuple[int, ...], dtype: torch.dtype, comp: Compression | None) -> list[TensorSpec]:
    numel = math.prod(shape)
    k = topk_count(numel, comp.fraction)
    return [TensorSpec(f"{name}:indices", torch.int32 if numel < 2**31 else torch.int64, (k,)),
            TensorSpec(f"{name}:values", dtype, (k,))]


def _topk_encode(d: torch.Tensor, specs: dict[str, TensorSpec], comp: Compression | None) -> Parts:
    idx, val = topk(d, comp.fraction)
    return {"indices": idx.to(specs["indices"].dtype), "values": val.to(specs["values"].dtype)}


def _topk_expand(parts: Parts, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(math.prod(shape), dtype=torch.float32, device=parts["values"].device)
    out[parts["indices"].long()] = parts["values"].float()
    return out.reshape(shape)


def _lowrank_specs(name: str, shape: tuple[int, ...], dtype: torch.dtype, comp: Compression | None) -> list[TensorSpec]:
    r = min(comp.rank, *shape)
    return [TensorSpec(f"{name}:u", dtype, (shape[0], r)), TensorSpec(f"{name}:v", dtype, (r, shape[1]))]


def _lowrank_encode(d: torch.Tensor, specs: dict[str, TensorSpec], comp: Compression | None) -> Parts:
    u, v = lowrank(d, comp.rank)
    return {"u": u.to(specs["u"].dtype), "v": v.to(specs["v"].dtype)}


def _lowrank_fits(got: dict[str, tuple[int, ...]], shape: tuple[int, ...]) -> bool:
    u, v = got["u"], got["v"]
    return len(shape) == 2 and len(u) == 2 and len(v) == 2 and u[0] == shape[0] and v[1] == shape[1] and u[1] == v[0]


ENCODINGS: dict[str, Encoding] = {e.name: e for e in (
    Encoding("full", ("",), True, lambda name, shape, dtype, comp: [TensorSpec(name, dtype, shape)], _full_encode,
             lambda parts, shape: parts[""].float(), lambda got, shape: got[""] == shape),
    Encoding("int8", ("q", "scale"), True, _int8_specs, _int8_encode, _int8_expand,
             lambda got, shape: got["q"] == shape and got["scale"] == ((1 if len(shape) < 2 else shape[0]),)),
    Encoding("topk", ("indices", "values"), False, _topk_specs, _topk_encode, _topk_expand,
             lambda got, shape: len(got["indices"]) == 1 and got["indices"] == got["values"] and got["indices"][0] <= math.prod(shape)),
    Encoding("lowrank", ("u", "v"), False, _lowrank_specs, _lowrank_encode,
             lambda parts, shape: parts["u"].float() @ parts["v"].float(), _lowrank_fits),
)}
