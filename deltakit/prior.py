"""DRIFT reasoning priors: export ``D = theta_LLM - theta_MLLM`` as one self-describing safetensors file, read it back.

:func:`export_prior` streams the selected text-tower tensors of two checkpoints (memory-mapped, a row
block at a time, or one tensor at a time when a compression needs the whole matrix), computes ``D`` in
float32 and writes it under canonical names (``layers.0.self_attn.q_proj.weight``) into a file that
appears only when complete. Everything needed to trust and reuse the prior is in the header's
``__metadata__``: both source folders with the sha256 of their ``config.json``, the families, the module
and layer selection, the dtype, normalization, compression and, per tensor, ``|D|`` and ``|W_MLLM|``.

:class:`Prior` opens such a file, validates it and hands out tensors, expanding a compressed one
(``lowrank:R``, ``topk:F``, ``int8``) transparently; it is the prior :class:`deltakit.drift.DriftBias`
binds. Format and trade-offs: ``docs/prior.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scipy.linalg
import torch

from deltakit import __version__
from deltakit.errors import DeltakitError, IncompatibleError
from deltakit.families import classify_canonical
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.writer import SafetensorsWriter, TensorSpec, check_output_free
from deltakit.model import LM_HEAD, MappedCheckpoint, open_model
from deltakit.pairing import canonical_order, pair
from deltakit.progress import ProgressFn, no_progress

FORMAT = "deltakit-prior"
FORMAT_VERSION = 1
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
MODULE_GROUPS = ("attn", "mlp", "norm", "embed", "lm_head")
MODULE_KINDS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
DEFAULT_MODULES = ("attn", "mlp")
ENCODINGS = ("full", "lowrank", "topk", "int8")
# The parts each encoding stores, as file keys "<canonical name>:<part>" ("full" stores the name itself).
PARTS = {"full": ("",), "lowrank": ("u", "v"), "topk": ("indices", "values"), "int8": ("q", "scale")}
DEFAULT_CHUNK_ELEMENTS = 1 << 20
_REQUIRED = ("format_version", "family", "sources", "modules", "layers", "skip_first", "dtype", "normalize",
             "compression", "tensors", "totals", "deltakit_version")
# json.dumps of any float is at most this long; placeholders of this length reserve header room for the
# statistics that are known only after the data is written (see SafetensorsWriter.rewrite_metadata).
_PLACEHOLDER = -2.2250738585072014e-308


class PriorError(DeltakitError):
    """A prior file, or an export request, that cannot be used as asked."""


# -- compression (pure tensor functions) ---------------------------------------------------------

@dataclass(frozen=True)
class Compression:
    """How D is stored: ``lowrank`` (rank), ``topk`` (fraction) or ``int8``; None means full tensors."""

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


def expand(encoding: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Rebuild the dense float32 tensor of ``shape`` from one encoding's stored parts."""
    if encoding == "full":
        return parts[""].float()
    if encoding == "lowrank":
        return parts["u"].float() @ parts["v"].float()
    if encoding == "topk":
        out = torch.zeros(math.prod(shape), dtype=torch.float32, device=parts["values"].device)
        out[parts["indices"].long()] = parts["values"].float()
        return out.reshape(shape)
    if encoding == "int8":
        q = parts["q"].float()
        return (q.reshape(parts["scale"].shape[0], -1) * parts["scale"].float()[:, None]).reshape(shape)
    raise ValueError(encoding)


def _part_specs(name: str, encoding: str, shape: tuple[int, ...], dtype: torch.dtype,
                comp: Compression | None) -> list[TensorSpec]:
    if encoding == "full":
        return [TensorSpec(name, dtype, shape)]
    if encoding == "lowrank":
        r = min(comp.rank, *shape)
        return [TensorSpec(f"{name}:u", dtype, (shape[0], r)), TensorSpec(f"{name}:v", dtype, (r, shape[1]))]
    if encoding == "topk":
        numel = math.prod(shape)
        k = topk_count(numel, comp.fraction)
        return [TensorSpec(f"{name}:indices", torch.int32 if numel < 2**31 else torch.int64, (k,)),
                TensorSpec(f"{name}:values", dtype, (k,))]
    rows = 1 if len(shape) < 2 else shape[0]
    return [TensorSpec(f"{name}:q", torch.int8, shape), TensorSpec(f"{name}:scale", torch.float32, (rows,))]


# -- selection -----------------------------------------------------------------------------------

def parse_layers(spec: str | None) -> list[tuple[int, int | None]] | None:
    """``"0:8,12:"`` -> ``[(0, 8), (12, None)]`` (``[start, end)``, open end allowed; ``"5"`` is layer 5)."""
    if spec is None or not spec.strip():
        return None
    ranges = []
    for part in spec.split(","):
        start, sep, end = part.strip().partition(":")
        try:
            a = int(start) if start else 0
            b = (int(end) if end else None) if sep else a + 1
        except ValueError:
            raise PriorError(f"bad layer range {part!r}; use START:END (END exclusive, either may be empty) or one index") from None
        if a < 0 or (b is not None and b <= a):
            raise PriorError(f"bad layer range {part!r}: empty or negative")
        ranges.append((a, b))
    return ranges


def parse_alpha(spec: str | dict[str, float] | None) -> dict[str, float]:
    """Per-module alpha from ``"attn=0.5,mlp.down=2"`` (or a dict); modules as in ``--modules``."""
    if spec is None or isinstance(spec, dict):
        out = dict(spec or {})
    else:
        out = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            module, sep, value = part.partition("=")
            try:
                out[module.strip()] = float(value)
            except ValueError:
                raise PriorError(f"bad alpha {part!r}; use MODULE=VALUE, e.g. attn=0.5,mlp=1") from None
            if not sep:
                raise PriorError(f"bad alpha {part!r}; use MODULE=VALUE, e.g. attn=0.5,mlp=1")
    bad = [m for m in out if m not in MODULE_GROUPS + MODULE_KINDS]
    if bad:
        raise PriorError(f"alpha for unknown module {bad[0]!r}; modules: {', '.join(MODULE_GROUPS + MODULE_KINDS)}")
    return {m: float(v) for m, v in out.items()}


def _check_modules(modules: tuple[str, ...]) -> tuple[str, ...]:
    bad = [m for m in modules if m not in MODULE_GROUPS + MODULE_KINDS]
    if bad or not modules:
        raise PriorError(f"unknown module {bad[0] if bad else '(none)'!r}; choose from {', '.join(MODULE_GROUPS + MODULE_KINDS)}")
    return modules


def selected(canonical: str, modules: tuple[str, ...], layers: list[tuple[int, int | None]] | None,
             skip_first: int) -> bool:
    """Whether a canonical text-tower tensor is in the prior.

    A tensor is kept when its kind (``attn.q`` ...) or group (``attn`` ...) is in ``modules``: ``attn``
    covers q, k, v, o weights and biases. The layer filter (ranges, then ``skip_first``) applies to
    per-layer tensors only; ``embed_tokens``, ``lm_head`` and the final ``norm`` are chosen by module alone.
    """
    layer, kind = classify_canonical(canonical)
    if kind == "other" or (kind not in modules and kind.split(".")[0] not in modules):
        return False
    if layer is None:
        return True
    if layer < skip_first:
        return False
    return layers is None or any(a <= layer and (b is None or layer < b) for a, b in layers)


def module_alpha(kind: str, alphas: dict[str, float]) -> float:
    """Alpha of a tensor of ``kind``: its kind's entry, else its group's, else 1."""
    return alphas.get(kind, alphas.get(kind.split(".")[0], 1.0))


# -- export --------------------------------------------------------------------------------------

@dataclass
class _Job:
    """One prior tensor: D = plus - minus over ``rows`` rows (the rest zero), W = the MLLM's tensor."""

    name: str
    kind: str
    layer: int | None
    shape: tuple[int, ...]
    plus: tuple[MappedCheckpoint, str]
    minus: tuple[MappedCheckpoint, str]
    weight: tuple[MappedCheckpoint, str]
    rows: int
    alpha: float
    encoding: str
    specs: list[TensorSpec]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Stats:
    """Float64 sums over one tensor: |D|^2 and |W|^2 (before scaling), and after scaling/encoding
    <D, D~>, |D~|^2, |D - D~|^2 where D~ is what :meth:`Prior.get` returns (in float32)."""

    d_sq: float = 0.0
    w_sq: float = 0.0
    dot: float = 0.0
    rec_sq: float = 0.0
    err_sq: float = 0.0


@dataclass
class PriorReport:
    """The result of :func:`export_prior`: what was written, sizes and fidelity (also the ``--json`` report)."""

    out: Path
    family: str
    mode: str
    sources: dict[str, Any]
    modules: list[str]
    layers: list | None
    skip_first: int
    dtype: str
    normalize: bool
    compression: dict[str, Any] | None
    tensors: dict[str, dict[str, Any]]
    totals: dict[str, Any]
    notes: list[str]
    bytes_on_disk: int
    seconds: float
    deltakit_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _source(m: MappedCheckpoint) -> dict[str, Any]:
    cfg = m.path / "config.json" if m.path.is_dir() else None
    sha = hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg is not None and cfg.exists() else None
    return {"path": str(Path(m.path).absolute()), "family": m.family.name, "config_sha256": sha}


def _plan(mllm: MappedCheckpoint, plus: MappedCheckpoint, minus: MappedCheckpoint, modules: tuple[str, ...],
          layers, skip_first: int, alphas: dict[str, float], dtype: torch.dtype,
          comp: Compression | None) -> tuple[list[_Job], list[str]]:
    names = [n for n in sorted(mllm.text, key=canonical_order) if selected(n, modules, layers, skip_first)]
    if mllm.tied and ("lm_head" in modules):
        raise IncompatibleError(f"{mllm.path} ties lm_head to embed_tokens, so there is no separate lm_head to bias; select embed instead")
    if not names:
        raise PriorError(f"no tensor of {mllm.path} matches modules {','.join(modules)} with this layer filter")
    wanted = set(names)
    notes: list[str] = []
    paired = {}
    for role, other in (("plus", plus), ("minus", minus)):
        if other is mllm:
            continue
        p = pair(mllm, other)
        bad = [(n, sa, sb) for n, sa, sb in p.shape_mismatch if n in wanted]
        if bad:
            n, sa, sb = bad[0]
            raise IncompatibleError(f"{n}: shape {list(sa)} in {mllm.path} but {list(sb)} in {other.path} ({len(bad)} tensors differ)")
        missing = [n for n in p.only_a if n in wanted]
        if missing:
            raise IncompatibleError(f"{missing[0]} is in {mllm.path} but not in {other.path} ({len(missing)} selected tensors missing; "
                                    f"narrow --modules/--layers?)")
        paired[role] = {t.canonical: t for t in p.matched}
        notes += [n for n in p.notes if n.split(":")[0] in wanted or (LM_HEAD in wanted and "ties lm_head" in n)]
    jobs = []
    for n in names:
        key = mllm.text[n]
        shape = tuple(mllm.ckpt.meta(key).shape)
        rows = shape[0]
        refs = {}
        for role, other in (("plus", plus), ("minus", minus)):
            if other is mllm:
                refs[role] = (mllm, key)
            else:
                t = paired[role][n]
                refs[role] = (other, t.key_b)
                rows = min(rows, t.rows if t.rows is not None else rows)
        if rows < shape[0]:
            notes.append(f"{n}: D covers the {rows} vocabulary rows all models share; the MLLM's other {shape[0] - rows} rows are 0 (no bias)")
        layer, kind = classify_canonical(n)
        encoding = comp.encoding(shape) if comp else "full"
        jobs.append(_Job(n, kind, layer, shape, refs["plus"], refs["minus"], (mllm, key), rows,
                         module_alpha(kind, alphas), encoding, _part_specs(n, encoding, shape, dtype, comp)))
    return jobs, notes


def _sq(x: torch.Tensor) -> float:
    x = x.reshape(-1).double()
    return float(torch.dot(x, x))


def _d_block(job: _Job, a: int, b: int) -> torch.Tensor:
    """Rows ``[a, b)`` of D in float32 (rows past the shared vocabulary are 0)."""
    if len(job.shape) < 2:
        return job.plus[0].ckpt.get(job.plus[1]).float() - job.minus[0].ckpt.get(job.minus[1]).float()
    out = torch.zeros((b - a, *job.shape[1:]), dtype=torch.float32)
    r = min(b, job.rows) - a
    if r > 0:
        plus = job.plus[0].ckpt.rows(job.plus[1], a, a + r)
        minus = job.minus[0].ckpt.rows(job.minus[1], a, a + r)
        torch.sub(plus.float(), minus.float(), out=out[:r])
    return out


def _release(job: _Job, a: int, b: int) -> None:
    for m, k in (job.plus, job.minus, job.weight):
        m.ckpt.release(k, a, b)


def _blocks(job: _Job, chunk_elements: int) -> list[tuple[int, int]]:
    n = job.shape[0]
    if len(job.shape) < 2:
        return [(0, n)]
    step = max(1, chunk_elements // math.prod(job.shape[1:]))
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _w_block(job: _Job, a: int, b: int) -> torch.Tensor:
    w = job.weight[0].ckpt.get(job.weight[1])
    return w if w.dim() < 2 else w[a:b]


def _norm_pass(job: _Job, stats: _Stats, chunk_elements: int) -> None:
    for a, b in _blocks(job, chunk_elements):
        stats.d_sq += _sq(_d_block(job, a, b))
        stats.w_sq += _sq(_w_block(job, a, b).float())
        _release(job, a, b)


def _encode(job: _Job, d: torch.Tensor, dtype: torch.dtype, comp: Compression | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The stored parts of (a row block of) D and their float32 expansion."""
    if job.encoding == "full":
        parts = {"": d.to(dtype)}
    elif job.encoding == "lowrank":
        u, v = lowrank(d, comp.rank)
        parts = {"u": u.to(dtype), "v": v.to(dtype)}
    elif job.encoding == "topk":
        idx, val = topk(d, comp.fraction)
        parts = {"indices": idx.to(job.specs[0].dtype), "values": val.to(dtype)}
    else:
        q, scale = int8_quantize(d)
        parts = {"q": q, "scale": scale}
    return parts, expand(job.encoding, parts, tuple(d.shape))


def _write_job(job: _Job, writer: SafetensorsWriter, dtype: torch.dtype, comp: Compression | None, normalize: bool,
               chunk_elements: int, progress: ProgressFn) -> _Stats:
    """Compute, encode and write one prior tensor; row blocks except for topk and wide low-rank matrices."""
    if job.encoding == "lowrank" and job.shape[0] >= job.shape[1]:
        return _write_lowrank_tall(job, writer, dtype, normalize, chunk_elements, progress)
    stats = _Stats()
    if normalize:
        _norm_pass(job, stats, chunk_elements)
    scale = _scale(stats, normalize)
    blocks = _blocks(job, chunk_elements) if job.encoding in ("full", "int8") else [(0, job.shape[0])]
    for a, b in blocks:
        d = _d_block(job, a, b)
        if not normalize:
            stats.d_sq += _sq(d)
            stats.w_sq += _sq(_w_block(job, a, b).float())
        if scale != 1.0:
            d.mul_(scale)
        parts, rec = _encode(job, d, dtype, comp)
        for part, t in parts.items():
            key = f"{job.name}:{part}" if part else job.name
            if len(blocks) == 1:
                writer.write(key, t.reshape(writer.specs[key].shape))
            else:
                writer.write_rows(key, a, t)
        _accumulate(stats, d, rec)
        _release(job, a, b)
        progress((b - a) * math.prod(job.shape[1:]), info=job.name)
    return stats


def _write_lowrank_tall(job: _Job, writer: SafetensorsWriter, dtype: torch.dtype, normalize: bool, chunk_elements: int,
                        progress: ProgressFn) -> _Stats:
    """Truncated SVD of a tall matrix in row blocks: pass 1 sums ``D^T D`` (and the norms), pass 2 writes ``u = D V_r``."""
    stats = _Stats()
    blocks = _blocks(job, chunk_elements)
    gram = torch.zeros(job.shape[1], job.shape[1], dtype=torch.float64)
    for a, b in blocks:
        d = _d_block(job, a, b)
        stats.d_sq += _sq(d)
        stats.w_sq += _sq(_w_block(job, a, b).float())
        gram += (d.T @ d).double()
        _release(job, a, b)
    scale = _scale(stats, normalize)
    v = top_eigenvectors(gram, job.specs[0].shape[1]).T.to(dtype)
    writer.write(f"{job.name}:v", v)
    vf = v.float()
    for a, b in blocks:
        d = _d_block(job, a, b).mul_(scale)
        u = (d @ vf.T).to(dtype)
        writer.write_rows(f"{job.name}:u", a, u)
        _accumulate(stats, d, u.float() @ vf)
        _release(job, a, b)
        progress((b - a) * job.shape[1], info=job.name)
    return stats


def _accumulate(stats: _Stats, d: torch.Tensor, rec: torch.Tensor) -> None:
    """Add a block's <D, D~>, |D~|^2 and |D - D~|^2 (float64) to ``stats``."""
    stats.dot += float(torch.dot(d.reshape(-1).double(), rec.reshape(-1).double()))
    stats.rec_sq += _sq(rec)
    stats.err_sq += _sq(d - rec)


def _scale(stats: _Stats, normalize: bool) -> float:
    """Normalization factor |W| / |D| (1 without --normalize, or for a zero D)."""
    if not normalize or stats.d_sq == 0.0:
        return 1.0
    return math.sqrt(stats.w_sq) / math.sqrt(stats.d_sq)


def _cosine(dot: float, a_sq: float, b_sq: float) -> float:
    if a_sq == 0.0 and b_sq == 0.0:
        return 1.0
    if a_sq == 0.0 or b_sq == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(a_sq * b_sq)))


def _entry(job: _Job, stats: _Stats | None, normalize: bool) -> dict[str, Any]:
    """The manifest entry of one tensor; with ``stats`` None, placeholders as long as any final value."""
    if stats is None:
        d_norm = w_norm = scale = cos = rel = stored = _PLACEHOLDER
    else:
        scale = _scale(stats, normalize)
        d_norm, w_norm = math.sqrt(stats.d_sq), math.sqrt(stats.w_sq)
        cos = _cosine(stats.dot, stats.d_sq * scale**2, stats.rec_sq)
        rel = math.sqrt(stats.err_sq) / (d_norm * scale) if d_norm * scale > 0 else 0.0
        stored = math.sqrt(stats.rec_sq)
    entry: dict[str, Any] = {"kind": job.kind, "layer": job.layer, "shape": list(job.shape), "encoding": job.encoding}
    if job.encoding == "lowrank":
        entry["rank"] = job.specs[0].shape[1]
    if job.encoding == "topk":
        entry["k"] = job.specs[0].shape[0]
    entry.update(rows=job.rows if job.rows < job.shape[0] else None, alpha=job.alpha, d_norm=d_norm,
                 w_norm=w_norm, scale=scale, stored_norm=stored, cosine=cos, rel_error=rel, bytes=sum(s.nbytes for s in job.specs))
    return entry


def _totals(jobs: list[_Job], stats: list[_Stats] | None, normalize: bool, dtype: torch.dtype) -> dict[str, Any]:
    full = sum(j.numel for j in jobs) * dtype.itemsize
    stored = sum(s.nbytes for j in jobs for s in j.specs)
    out: dict[str, Any] = {"tensors": len(jobs), "params": sum(j.numel for j in jobs), "data_bytes": stored,
                           "full_bytes": full}
    if stats is None:
        return {**out, **dict.fromkeys(("d_norm", "w_norm", "cosine", "min_cosine", "rel_error"), _PLACEHOLDER)}
    scales = [_scale(s, normalize) for s in stats]
    ref_sq = sum(s.d_sq * c**2 for s, c in zip(stats, scales))
    return {**out, "d_norm": math.sqrt(sum(s.d_sq for s in stats)), "w_norm": math.sqrt(sum(s.w_sq for s in stats)),
            "cosine": _cosine(sum(s.dot for s in stats), ref_sq, sum(s.rec_sq for s in stats)),
            "min_cosine": min(_cosine(s.dot, s.d_sq * c**2, s.rec_sq) for s, c in zip(stats, scales)),
            "rel_error": math.sqrt(sum(s.err_sq for s in stats) / ref_sq) if ref_sq else 0.0}


def export_prior(mllm: str | os.PathLike, llm: str | os.PathLike | None, out: str | os.PathLike, *,
                 from_llm: str | os.PathLike | None = None, to_llm: str | os.PathLike | None = None,
                 modules: tuple[str, ...] | list[str] = DEFAULT_MODULES, layers: str | list | None = None,
                 skip_first: int = 0, dtype: str = "bfloat16", normalize: bool = False, compress: str | None = None,
                 alpha: str | dict[str, float] | None = None, force: bool = False, progress: ProgressFn = no_progress,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> PriorReport:
    """Write the DRIFT prior ``D = theta_llm - theta_mllm`` for the MLLM ``mllm`` to ``out`` (a .safetensors file).

    Two-model mode (``llm=None``, ``from_llm`` and ``to_llm`` given): ``D = theta_to - theta_from`` (two
    LLMs of one family), named and shaped for ``mllm``. ``modules`` are groups (``attn mlp norm embed
    lm_head``) or kinds (``attn.q`` ... ``mlp.down``); ``layers`` are ranges (``"0:8,12:"`` or a list of
    ``(start, end)``) and ``skip_first`` drops the first n layers. ``dtype`` is ``bfloat16`` or ``float32``;
    ``normalize`` rescales each D so ``|D| = |W_MLLM|``; ``compress`` is ``lowrank:R``, ``topk:F`` or
    ``int8``; ``alpha`` sets a per-module DRIFT alpha (``"attn=0.5,mlp=1"``). Vocabulary tensors cover the
    rows all models share; the MLLM's extra rows get D = 0, an LLM's extra rows are ignored.
    Raises :class:`DeltakitError` subclasses for bad input; ``out`` appears only when complete.
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise PriorError(f"unknown prior dtype {dtype!r}; choose bfloat16 or float32")
    two_model = from_llm is not None or to_llm is not None
    if (llm is not None) == two_model or (two_model and (from_llm is None or to_llm is None)):
        raise PriorError("give either --llm (D = LLM - MLLM) or both --from and --to (D = TO - FROM), not both")
    if skip_first < 0:
        raise PriorError(f"--skip-first must be >= 0, got {skip_first}")
    modules = _check_modules(tuple(modules))
    ranges = parse_layers(layers) if isinstance(layers, str) or layers is None else [tuple(r) for r in layers]
    alphas = parse_alpha(alpha)
    comp = Compression.parse(compress)
    out = check_output_free(out, force)
    if out.suffix != ".safetensors":
        raise PriorError(f"{out}: a prior is one .safetensors file; name the output *.safetensors")
    target = open_model(mllm)
    opened = [target]
    try:
        if not target.family.multimodal:
            raise IncompatibleError(f"{target.path} is a text-only {target.family.name} model; --mllm must be the multimodal model the prior is for")
        if llm is not None:
            plus, minus, mode = open_model(llm), target, "llm-mllm"
            opened.append(plus)
            sources = {"mllm": _source(target), "llm": _source(plus)}
        else:
            minus = open_model(from_llm)
            opened.append(minus)
            plus = open_model(to_llm)
            opened.append(plus)
            mode = "two-model"
            if minus.family.name != plus.family.name:
                raise IncompatibleError(f"--from is {minus.family.name} but --to is {plus.family.name}; two-model mode needs two LLMs of one family")
            sources = {"mllm": _source(target), "from": _source(minus), "to": _source(plus)}
        torch_dtype = DTYPES[dtype]
        jobs, notes = _plan(target, plus, minus, modules, ranges, skip_first, alphas, torch_dtype, comp)
        base_meta = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "deltakit_version": __version__,
            "family": target.family.name, "mode": mode, "sources": json.dumps(sources), "modules": json.dumps(list(modules)),
            "layers": json.dumps(ranges), "skip_first": str(skip_first), "dtype": dtype, "normalize": json.dumps(normalize),
            "compression": json.dumps(comp.to_dict() if comp else None), "alpha": json.dumps(alphas), "notes": json.dumps(notes),
        }

        def metadata(stats: list[_Stats] | None) -> dict[str, str]:
            entries = {j.name: _entry(j, s, normalize) for j, s in zip(jobs, stats or [None] * len(jobs))}
            return {**base_meta, "tensors": json.dumps(entries), "totals": json.dumps(_totals(jobs, stats, normalize, torch_dtype))}

        specs = [s for j in jobs for s in j.specs]
        progress(0, total=sum(j.numel for j in jobs), description=f"prior ({comp or dtype})")
        out.parent.mkdir(parents=True, exist_ok=True)
        with SafetensorsWriter(out, specs, metadata(None)) as writer:
            stats = []
            for j in jobs:
                stats.append(_write_job(j, writer, torch_dtype, comp, normalize, chunk_elements, progress))
                if not (math.isfinite(stats[-1].d_sq) and math.isfinite(stats[-1].w_sq)):
                    raise PriorError(f"{j.name}: NaN or Inf in the inputs ({j.plus[1]} / {j.minus[1]}); nothing was written")
            final = metadata(stats)
            writer.rewrite_metadata(final)
        if normalize:
            zero = [j.name for j, s in zip(jobs, stats) if s.w_sq == 0.0]
            if zero:
                notes.append(f"{len(zero)} tensors have |W_MLLM| = 0 (e.g. {zero[0]}, zero-initialised biases): --normalize made their D 0")
    finally:
        for m in opened:
            m.ckpt.close()
    return PriorReport(out, target.family.name, mode, sources, list(modules), ranges, skip_first, dtype, normalize,
                       comp.to_dict() if comp else None, json.loads(final["tensors"]), json.loads(final["totals"]), notes,
                       out.stat().st_size, time.perf_counter() - start)


# -- reading -------------------------------------------------------------------------------------

def per_module(entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-module-kind totals of a prior's per-tensor entries: tensors, params, |D|, |W|, |D|/|W|, bytes, fidelity."""
    groups: dict[str, dict[str, float]] = {}
    for e in entries.values():
        g = groups.setdefault(e["kind"], {"tensors": 0, "params": 0, "d_sq": 0.0, "w_sq": 0.0, "ref_sq": 0.0,
                                          "dot": 0.0, "rec_sq": 0.0, "bytes": 0})
        ref, rec = e["d_norm"] * e["scale"], e["stored_norm"]
        g["tensors"] += 1
        g["params"] += math.prod(e["shape"])
        g["d_sq"] += e["d_norm"] ** 2
        g["w_sq"] += e["w_norm"] ** 2
        g["bytes"] += e["bytes"]
        g["ref_sq"] += ref**2
        g["dot"] += e["cosine"] * ref * rec
        g["rec_sq"] += rec**2
    order = {k: i for i, k in enumerate(MODULE_KINDS + ("norm", "embed", "lm_head"))}
    modules = {}
    for kind in sorted(groups, key=lambda k: order.get(k, len(order))):
        g = groups[kind]
        d, w = math.sqrt(g["d_sq"]), math.sqrt(g["w_sq"])
        modules[kind] = {"tensors": g["tensors"], "params": g["params"], "d_norm": d, "w_norm": w,
                         "ratio": d / w if w else None, "bytes": g["bytes"],
                         "cosine": _cosine(g["dot"], g["ref_sq"], g["rec_sq"])}
    return modules


class Prior:
    """A prior file written by :func:`export_prior`: validated on open, tensors expanded on :meth:`get`.

    ``names`` are canonical text-tower names, ``family`` the MLLM family it was built for, ``metadata``
    the parsed header metadata (JSON values decoded), ``entries`` the per-tensor manifest.
    """

    def __init__(self, path: Path, ckpt: Checkpoint, metadata: dict[str, Any]):
        self.path = path
        self._ckpt = ckpt
        self.metadata = metadata
        self.family: str = metadata["family"]
        self.entries: dict[str, dict[str, Any]] = metadata["tensors"]
        self.names: list[str] = list(self.entries)
        self.dtype: torch.dtype = DTYPES[metadata["dtype"]]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Prior":
        """Open and validate a prior (a .safetensors file, or a folder holding exactly one)."""
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise PriorError(f"{path}: a prior folder must hold exactly one .safetensors file, found {len(files)}")
            path = files[0]
        ckpt = Checkpoint.open(path)
        raw = ckpt.metadata()
        if raw.get("format") != FORMAT:
            raise PriorError(f"{path}: not a deltakit prior (no '{FORMAT}' metadata; write one with `deltakit prior`)")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise PriorError(f"{path}: prior metadata lacks {missing[0]!r} (damaged or hand-edited file)")
        if raw["format_version"] != str(FORMAT_VERSION):
            raise PriorError(f"{path}: prior format version {raw['format_version']}, this deltakit {__version__} reads {FORMAT_VERSION}")
        meta: dict[str, Any] = {}
        for k, v in raw.items():
            try:
                meta[k] = json.loads(v) if k in ("sources", "modules", "layers", "normalize", "compression", "alpha",
                                                 "notes", "tensors", "totals", "skip_first") else v
            except json.JSONDecodeError:
                raise PriorError(f"{path}: prior metadata {k!r} is not valid JSON (damaged file)") from None
        if meta["dtype"] not in DTYPES or not isinstance(meta["tensors"], dict):
            raise PriorError(f"{path}: prior metadata has an unknown dtype {meta['dtype']!r} or no tensor table")
        prior = cls(path, ckpt, meta)
        prior._validate(ckpt)
        return prior

    def _validate(self, ckpt: Checkpoint) -> None:
        expected: set[str] = set()
        for name, e in self.entries.items():
            if not isinstance(e, dict) or classify_canonical(name)[1] == "other":
                raise PriorError(f"{self.path}: unknown tensor name {name!r} (not a canonical text-tower name)")
            enc = e.get("encoding")
            if enc not in ENCODINGS or not isinstance(e.get("shape"), list):
                raise PriorError(f"{self.path}: tensor {name!r} has an unknown encoding {enc!r} or no shape")
            shape = tuple(e["shape"])
            for part in PARTS[enc]:
                key = f"{name}:{part}" if part else name
                if key not in ckpt:
                    raise PriorError(f"{self.path}: tensor {key!r} listed in the metadata is missing from the file")
                expected.add(key)
            got = {p: tuple(ckpt.meta(f"{name}:{p}" if p else name).shape) for p in PARTS[enc]}
            if not _parts_fit(enc, got, shape):
                raise PriorError(f"{self.path}: stored parts of {name!r} {got} do not fit shape {list(shape)} ({enc})")
        extra = [k for k in ckpt.keys() if k not in expected]
        if extra:
            raise PriorError(f"{self.path}: unknown tensor {extra[0]!r} not listed in the prior metadata ({len(extra)} such)")

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of D for ``name`` (the MLLM parameter's shape)."""
        return tuple(self._entry(name)["shape"])

    def alpha(self, name: str) -> float:
        """The per-module alpha stored for ``name`` (1.0 unless exported with ``alpha``)."""
        return float(self._entry(name).get("alpha", 1.0))

    def get(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """D for ``name`` as a new tensor, in the prior's dtype unless ``dtype`` is given; compressed priors are expanded."""
        e = self._entry(name)
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else torch.device("cpu")
        if e["encoding"] == "full":
            return self._ckpt.get(name).to(device=device, dtype=dtype, copy=True)
        parts = {p: self._ckpt.get(f"{name}:{p}").to(device) for p in PARTS[e["encoding"]]}
        return expand(e["encoding"], parts, tuple(e["shape"])).to(dtype)

    def summary(self) -> dict[str, Any]:
        """Metadata plus the per-module totals of :func:`per_module`, for ``inspect``."""
        meta = {k: v for k, v in self.metadata.items() if k != "tensors"}
        return {"path": str(self.path), "bytes_on_disk": self.path.stat().st_size, **meta, "per_module": per_module(self.entries)}

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self.entries[name]
        except KeyError:
            raise PriorError(f"{self.path}: no tensor {name!r} in this prior") from None

    def close(self) -> None:
        self._ckpt.close()

    def __repr__(self) -> str:
        return f"Prior({str(self.path)!r}, {self.family}, {len(self)} tensors)"


def _parts_fit(encoding: str, got: dict[str, tuple[int, ...]], shape: tuple[int, ...]) -> bool:
    if encoding == "full":
        return got[""] == shape
    if encoding == "lowrank":
        u, v = got["u"], got["v"]
        return len(shape) == 2 and len(u) == 2 and len(v) == 2 and u[0] == shape[0] and v[1] == shape[1] and u[1] == v[0]
    if encoding == "topk":
        return len(got["indices"]) == 1 and got["indices"] == got["values"] and got["indices"][0] <= math.prod(shape)
    return got["q"] == shape and got["scale"] == ((1 if len(shape) < 2 else shape[0]),)
