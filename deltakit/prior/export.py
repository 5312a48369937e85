"""Exporting a DRIFT prior ``D = theta_LLM - theta_MLLM`` on the streaming engine.

:func:`plan_prior` decides, per selected canonical tensor of the MLLM, where its two sides are read
(``plus - minus``: LLM - MLLM, or TO - FROM in two-model mode), how many rows all models share (the
MLLM's extra vocabulary rows get D = 0) and how it is stored (:mod:`deltakit.prior.encodings`).
:func:`export_prior` turns that plan into engine jobs and runs them with
:func:`deltakit.engine.executor.execute` into one :class:`~deltakit.io.writer.SafetensorsWriter`:
row-block encodings (``full``, ``int8``) stream block by block on every thread (``--normalize`` first
runs one norm pass over the same blocks), whole-tensor encodings (``topk``, ``lowrank``) are one unit
per tensor. Statistics (``|D|``, ``|W_MLLM|``, fidelity of the stored D) are float64 sums per block,
reduced in block order, and rewritten into the header planned with placeholders of the same length.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from deltakit import __version__
from deltakit.engine.executor import DEFAULT_BLOCK_ELEMENTS, Block, Job, Read, execute, whole_rows
from deltakit.engine.selection import DEFAULT_MODULES as _DEFAULTS
from deltakit.engine.selection import PRIOR_MODULES, Selection, SelectionError
from deltakit.engine.sums import Summed, dot64
from deltakit.engine.sums import sq64 as _sq
from deltakit.errors import IncompatibleError
from deltakit.families import Part, classify_canonical
from deltakit.io.writer import SafetensorsWriter, TensorSpec, check_output_free
from deltakit.model import LM_HEAD, MappedCheckpoint, open_model
from deltakit.pairing import canonical_order, pair
from deltakit.prior.encodings import ENCODINGS, Compression, Encoding, PriorError, top_eigenvectors
from deltakit.prior.file import DTYPES, FORMAT, FORMAT_VERSION, cosine
from deltakit.progress import ProgressFn, no_progress

DEFAULT_MODULES = _DEFAULTS["prior"]
# json.dumps of any float is at most this long; placeholders of this length reserve header room for the
# statistics that are known only after the data is written (see SafetensorsWriter.rewrite_metadata).
_PLACEHOLDER = -2.2250738585072014e-308


@dataclass
class PriorTensor:
    """One planned prior tensor: D = plus - minus over rows ``[0, rows)`` (the rest 0); W is the MLLM's tensor."""

    name: str
    kind: str
    layer: int | None
    shape: tuple[int, ...]
    plus: tuple[MappedCheckpoint, Part]
    minus: tuple[MappedCheckpoint, Part]
    weight: tuple[MappedCheckpoint, Part]
    rows: int
    alpha: float
    encoding: Encoding
    specs: list[TensorSpec]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:])

    @functools.cached_property
    def part_specs(self) -> dict[str, TensorSpec]:
        """The stored parts' layouts by part name (``""`` for a full tensor)."""
        return dict(zip(self.encoding.parts, self.specs))

    def reads(self) -> tuple[list[Read], int]:
        """The engine inputs ``[plus, minus(, weight)]`` in float32, and the index of W among them."""
        reads = [Read.of(m.ckpt, part, torch.float32) for m, part in (self.plus, self.minus)]
        if self.weight == self.minus:
            return reads, 1
        return reads + [Read.of(self.weight[0].ckpt, self.weight[1], torch.float32)], 2


@dataclass
class Stats(Summed):
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
    selection: dict[str, Any] = field(default_factory=dict)
    deltakit_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


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
    bad = [m for m in out if m not in PRIOR_MODULES]
    if bad:
        raise PriorError(f"alpha for unknown module {bad[0]!r}; modules: {', '.join(PRIOR_MODULES)}")
    return {m: float(v) for m, v in out.items()}


def module_alpha(kind: str, alphas: dict[str, float]) -> float:
    """Alpha of a tensor of ``kind``: its kind's entry, else its group's, else 1."""
    return alphas.get(kind, alphas.get(kind.split(".")[0], 1.0))


def _source(m: MappedCheckpoint) -> dict[str, Any]:
    cfg = m.path / "config.json" if m.path.is_dir() else None
    sha = hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg is not None and cfg.exists() else None
    return {"path": str(Path(m.path).absolute()), "family": m.family.name, "config_sha256": sha}


def plan_prior(mllm: MappedCheckpoint, plus: MappedCheckpoint, minus: MappedCheckpoint, selection: Selection,
               alphas: dict[str, float], dtype: torch.dtype, comp: Compression | None) -> tuple[list[PriorTensor], list[str]]:
    """The prior tensors for ``selection`` of ``mllm``'s text tower, and notes on vocabulary and ties.

    Raises :class:`IncompatibleError` when a selected tensor is missing from, or shaped differently in,
    ``plus`` or ``minus``.
    """
    names = [n for n in sorted(mllm.text, key=canonical_order) if selection(n)]
    if mllm.tied and "lm_head" in selection.modules:
        raise IncompatibleError(f"{mllm.path} ties lm_head to embed_tokens, so there is no separate lm_head to bias; select embed instead")
    if not names:
        raise PriorError(f"no tensor of {mllm.path} matches modules {','.join(selection.modules)} with this layer/name filter")
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
    tensors = []
    for n in names:
        part = mllm.text[n]
        shape = tuple(part.shape)
        rows = shape[0]
        refs = {}
        for role, other in (("plus", plus), ("minus", minus)):
            if other is mllm:
                refs[role] = (mllm, part)
            else:
                t = paired[role][n]
                refs[role] = (other, t.part_b)
                rows = min(rows, t.rows if t.rows is not None else rows)
        if rows < shape[0]:
            notes.append(f"{n}: D covers the {rows} vocabulary rows all models share; the MLLM's other {shape[0] - rows} rows are 0 (no bias)")
        layer, kind = classify_canonical(n)
        encoding = ENCODINGS[comp.encoding(shape) if comp else "full"]
        tensors.append(PriorTensor(n, kind, layer, shape, refs["plus"], refs["minus"], (mllm, part), rows,
                                   module_alpha(kind, alphas), encoding, encoding.specs(n, shape, dtype, comp)))
    return tensors, notes


# -- the engine jobs -----------------------------------------------------------------------------

def _fidelity(d: torch.Tensor, rec: torch.Tensor) -> Stats:
    """A block's <D, D~>, |D~|^2 and |D - D~|^2."""
    return Stats(dot=dot64(d, rec), rec_sq=_sq(rec), err_sq=_sq(d - rec))


def _d_rows(t: PriorTensor, w: int, block: Block, a: int, b: int) -> tuple[torch.Tensor, float]:
    """Rows ``[a, b)`` of D in float32 (rows past the shared vocabulary are 0) and |W|^2 of the same rows.

    When the minus side is the MLLM itself (``w == 1``), W's rows are the ones just read for D.
    """
    r = min(b, t.rows) - a
    minus = block.read(1, a, b if w == 1 else a + max(r, 0))
    if r == b - a:  # the common case: every row is shared, no zero fill
        out = torch.sub(block.read(0, a, b), minus)
    else:
        out = torch.zeros((b - a, *t.shape[1:]), dtype=torch.float32)
        if r > 0:
            torch.sub(block.read(0, a, a + r), minus[:r], out=out[:r])
    return out, _sq(minus) if w == 1 else _sq(block.read(w, a, b))


def _norms(t: PriorTensor, w: int, block: Block) -> Stats:
    d, w_sq = _d_rows(t, w, block, block.start, block.stop)
    return Stats(d_sq=_sq(d), w_sq=w_sq)


def _write_parts(t: PriorTensor, block: Block, row: int, parts: dict[str, torch.Tensor]) -> None:
    for part, value in parts.items():
        block.write(t.encoding.key(t.name, part), row, value)


def _encode_rows(t: PriorTensor, w: int, block: Block, *, scale: float | None, comp: Compression | None) -> Stats:
    """One row block of a row-streamed encoding; ``scale`` None means "not normalized: count the norms here"."""
    d, w_sq = _d_rows(t, w, block, block.start, block.stop)
    stats = Stats() if scale is not None else Stats(d_sq=_sq(d), w_sq=w_sq)
    if scale not in (None, 1.0):
        d.mul_(scale)
    parts = t.encoding.encode(d, t.part_specs, comp)
    _write_parts(t, block, block.start, parts)
    fid = _fidelity(d, t.encoding.expand(parts, tuple(d.shape)))
    stats.add(fid)
    return stats


def _encode_whole(t: PriorTensor, w: int, block: Block, *, normalize: bool, comp: Compression | None) -> Stats:
    """A whole-tensor encoding: D assembled from row blocks (a tall low-rank matrix streams instead)."""
    if t.encoding.name == "lowrank" and t.shape[0] >= t.shape[1]:
        return _lowrank_tall(t, w, normalize, block)
    pieces = [_d_rows(t, w, block, a, b) for a, b in block.sub_blocks()]
    d = torch.cat([p for p, _ in pieces])
    stats = Stats(d_sq=_sq(d), w_sq=sum(w_sq for _, w_sq in pieces))
    scale = _scale(stats, normalize)
    if scale != 1.0:
        d.mul_(scale)
    parts = t.encoding.encode(d.reshape(t.shape), t.part_specs, comp)
    _write_parts(t, block, 0, parts)
    stats.add(_fidelity(d, t.encoding.expand(parts, t.shape)))
    return stats


def _lowrank_tall(t: PriorTensor, w: int, normalize: bool, block: Block) -> Stats:
    """Truncated SVD of a tall matrix in row blocks: pass 1 sums ``D^T D`` (and the norms), pass 2 writes ``u = D V_r``."""
    stats = Stats()
    gram = torch.zeros(t.shape[1], t.shape[1], dtype=torch.float64)
    for a, b in block.sub_blocks():
        d, w_sq = _d_rows(t, w, block, a, b)
        stats.d_sq += _sq(d)
        stats.w_sq += w_sq
        gram += (d.T @ d).double()
    scale = _scale(stats, normalize)
    u_spec, v_spec = t.specs
    v = top_eigenvectors(gram, u_spec.shape[1]).T.to(v_spec.dtype)
    block.write(v_spec.name, 0, v)
    vf = v.float()
    for a, b in block.sub_blocks():
        d = _d_rows(t, w, block, a, b)[0].mul_(scale)
        u = (d @ vf.T).to(u_spec.dtype)
        block.write(u_spec.name, a, u)
        stats.add(_fidelity(d, u.float() @ vf))
    return stats


def _scale(stats: Stats, normalize: bool) -> float:
    """Normalization factor |W| / |D| (1 without --normalize, or for a zero D)."""
    if not normalize or stats.d_sq == 0.0:
        return 1.0
    return math.sqrt(stats.w_sq) / math.sqrt(stats.d_sq)


def _job(t: PriorTensor, compute, whole: bool = False) -> Job:
    reads, w = t.reads()
    n = t.shape[0] if t.shape else 1
    rows = n if len(t.shape) < 2 else whole_rows(reads)  # a vector is one block (int8 scales it as one row)
    return Job(t.name, reads, 0, n, t.row_elements, partial(compute, t, w), whole=whole, block_rows=rows)


def _run(tensors: list[PriorTensor], writer: SafetensorsWriter, normalize: bool, comp: Compression | None, threads: int | None,
         block_elements: int, progress: ProgressFn, label: str) -> list[Stats]:
    """Every prior tensor through the engine: a norm pass first when normalizing row-streamed encodings."""
    def run(jobs: list[Job], description: str) -> list[Stats]:
        return [Stats.total(per_block) for per_block in execute(jobs, writer, threads=threads, block_elements=block_elements,
                                                                progress=progress, description=description)]

    streamed = [t for t in tensors if t.encoding.rows]
    scales: dict[str, float | None] = dict.fromkeys((t.name for t in streamed), None)
    norms: dict[str, Stats] = {}
    if normalize and streamed:
        norms = dict(zip((t.name for t in streamed), run([_job(t, _norms) for t in streamed], f"prior norms ({label})")))
        scales = {name: _scale(s, True) for name, s in norms.items()}
    jobs = [_job(t, partial(_encode_rows, scale=scales[t.name], comp=comp)) if t.encoding.rows
            else _job(t, partial(_encode_whole, normalize=normalize, comp=comp), whole=True) for t in tensors]
    stats = run(jobs, f"prior ({label})")
    for t, s in zip(tensors, stats):
        if t.name in norms:
            s.d_sq, s.w_sq = norms[t.name].d_sq, norms[t.name].w_sq
    return stats


# -- the manifest --------------------------------------------------------------------------------

def _entry(t: PriorTensor, stats: Stats | None, normalize: bool) -> dict[str, Any]:
    """The manifest entry of one tensor; with ``stats`` None, placeholders as long as any final value."""
    if stats is None:
        d_norm = w_norm = scale = cos = rel = stored = _PLACEHOLDER
    else:
        scale = _scale(stats, normalize)
        d_norm, w_norm = math.sqrt(stats.d_sq), math.sqrt(stats.w_sq)
        cos = cosine(stats.dot, stats.d_sq * scale**2, stats.rec_sq)
        rel = math.sqrt(stats.err_sq) / (d_norm * scale) if d_norm * scale > 0 else 0.0
        stored = math.sqrt(stats.rec_sq)
    entry: dict[str, Any] = {"kind": t.kind, "layer": t.layer, "shape": list(t.shape), "encoding": t.encoding.name}
    if t.encoding.name == "lowrank":
        entry["rank"] = t.specs[0].shape[1]
    if t.encoding.name == "topk":
        entry["k"] = t.specs[0].shape[0]
    entry.update(rows=t.rows if t.rows < t.shape[0] else None, alpha=t.alpha, d_norm=d_norm,
                 w_norm=w_norm, scale=scale, stored_norm=stored, cosine=cos, rel_error=rel, bytes=sum(s.nbytes for s in t.specs))
    return entry


def _totals(tensors: list[PriorTensor], stats: list[Stats] | None, normalize: bool, dtype: torch.dtype) -> dict[str, Any]:
    full = sum(t.numel for t in tensors) * dtype.itemsize
    stored = sum(s.nbytes for t in tensors for s in t.specs)
    out: dict[str, Any] = {"tensors": len(tensors), "params": sum(t.numel for t in tensors), "data_bytes": stored,
                           "full_bytes": full}
    if stats is None:
        return {**out, **dict.fromkeys(("d_norm", "w_norm", "cosine", "min_cosine", "rel_error"), _PLACEHOLDER)}
    scales = [_scale(s, normalize) for s in stats]
    ref_sq = sum(s.d_sq * c**2 for s, c in zip(stats, scales))
    return {**out, "d_norm": math.sqrt(sum(s.d_sq for s in stats)), "w_norm": math.sqrt(sum(s.w_sq for s in stats)),
            "cosine": cosine(sum(s.dot for s in stats), ref_sq, sum(s.rec_sq for s in stats)),
            "min_cosine": min(cosine(s.dot, s.d_sq * c**2, s.rec_sq) for s, c in zip(stats, scales)),
            "rel_error": math.sqrt(sum(s.err_sq for s in stats) / ref_sq) if ref_sq else 0.0}


def _zero_w_note(zero: list[str]) -> str:
    """The ``--normalize`` note on the tensors whose MLLM weight is all zeros (their D is scaled to 0)."""
    return f"{len(zero)} tensors have |W_MLLM| = 0 (e.g. {zero[0]}, zero-initialised biases): --normalize made their D 0"


def export_prior(mllm: str | os.PathLike, llm: str | os.PathLike | None, out: str | os.PathLike, *,
                 from_llm: str | os.PathLike | None = None, to_llm: str | os.PathLike | None = None,
                 modules: str | tuple[str, ...] | list[str] = DEFAULT_MODULES, layers: str | list | None = None,
                 skip_first: int = 0, include: str | list[str] | None = None, exclude: str | list[str] | None = None,
                 dtype: str = "bfloat16", normalize: bool = False, compress: str | None = None,
                 alpha: str | dict[str, float] | None = None, force: bool = False, progress: ProgressFn = no_progress,
                 threads: int | None = None, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> PriorReport:
    """Write the DRIFT prior ``D = theta_llm - theta_mllm`` for the MLLM ``mllm`` to ``out`` (a .safetensors file).

    Two-model mode (``llm=None``, ``from_llm`` and ``to_llm`` given): ``D = theta_to - theta_from`` (two
    LLMs of one family), named and shaped for ``mllm``. The selection (``modules`` groups ``attn mlp norm
    embed lm_head`` or kinds ``attn.q`` ... ``mlp.down``; ``layers`` ranges ``"0:8,12:"``; ``skip_first``;
    ``include``/``exclude`` name globs) is :class:`deltakit.engine.selection.Selection`'s. ``dtype`` is
    ``bfloat16`` or ``float32``; ``normalize`` rescales each D so ``|D| = |W_MLLM|``; ``compress`` is
    ``lowrank:R``, ``topk:F`` or ``int8``; ``alpha`` sets a per-module DRIFT alpha (``"attn=0.5,mlp=1"``).
    Vocabulary tensors cover the rows all models share; the MLLM's extra rows get D = 0, an LLM's extra
    rows are ignored. Raises :class:`DeltakitError` subclasses for bad input; ``out`` appears only when complete.
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise PriorError(f"unknown prior dtype {dtype!r}; choose bfloat16 or float32")
    two_model = from_llm is not None or to_llm is not None
    if (llm is not None) == two_model or (two_model and (from_llm is None or to_llm is None)):
        raise PriorError("give either --llm (D = LLM - MLLM) or both --from and --to (D = TO - FROM), not both")
    try:
        selection = Selection.parse(modules, layers, skip_first, include, exclude)
    except SelectionError as exc:
        raise PriorError(str(exc)) from None
    if "other" in selection.modules:
        raise PriorError(f"a prior holds named modules only; choose from {', '.join(PRIOR_MODULES)}")
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
        tensors, notes = plan_prior(target, plus, minus, selection, alphas, torch_dtype, comp)
        ranges = [list(r) for r in selection.layers] if selection.layers is not None else None
        base_meta = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "deltakit_version": __version__,
            "family": target.family.name, "mode": mode, "sources": json.dumps(sources),
            "modules": json.dumps(list(selection.modules)), "layers": json.dumps(ranges),
            "skip_first": str(selection.skip_first), "selection": json.dumps(selection.to_dict()), "dtype": dtype,
            "normalize": json.dumps(normalize), "compression": json.dumps(comp.to_dict() if comp else None),
            "alpha": json.dumps(alphas),
        }

        def metadata(stats: list[Stats] | None, header_notes: list[str]) -> dict[str, str]:
            entries = {t.name: _entry(t, s, normalize) for t, s in zip(tensors, stats or [None] * len(tensors))}
            return {**base_meta, "notes": json.dumps(header_notes), "tensors": json.dumps(entries),
                    "totals": json.dumps(_totals(tensors, stats, normalize, torch_dtype))}

        # Under --normalize, which tensors have |W_MLLM| = 0 is known only once the data is written (whole-tensor
        # encodings have no separate norm pass), so the planned header holds that note's longest form (every
        # tensor, the longest name) as a placeholder, and the final header, with the real note, always fits.
        reserve = [_zero_w_note([max((t.name for t in tensors), key=len)] * len(tensors))] if normalize else []
        specs = [s for t in tensors for s in t.specs]
        out.parent.mkdir(parents=True, exist_ok=True)
        with SafetensorsWriter(out, specs, metadata(None, notes + reserve)) as writer:
            stats = _run(tensors, writer, normalize, comp, threads, block_elements, progress, str(comp or dtype))
            bad = [t for t, s in zip(tensors, stats) if not (math.isfinite(s.d_sq) and math.isfinite(s.w_sq))]
            if bad:
                raise PriorError(f"{bad[0].name}: NaN or Inf in the inputs ({bad[0].plus[1].key} / {bad[0].minus[1].key}); nothing was written")
            zero = [t.name for t, s in zip(tensors, stats) if s.w_sq == 0.0] if normalize else []
            if zero:
                notes.append(_zero_w_note(zero))
            final = metadata(stats, notes)
            writer.rewrite_metadata(final)
    finally:
        for m in opened:
            m.ckpt.close()
    return PriorReport(out, target.family.name, mode, sources, list(selection.modules), ranges, selection.skip_first, dtype,
                       normalize, comp.to_dict() if comp else None, json.loads(final["tensors"]), json.loads(final["totals"]),
                       notes, out.stat().st_size, time.perf_counter() - start, selection.to_dict())
