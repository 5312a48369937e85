"""Planning a merge: open the inputs, match their text towers to the MLLM's, decide per output tensor what to do.

The output has exactly the MLLM's keys, shapes and order. A text-tower tensor whose module and layer are
selected is merged from every input's tensor of the same canonical name (vocab tensors over the rows
all inputs share); everything else (vision tower, projector, unselected modules, extra vocab rows) is
copied from the MLLM byte for byte.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from deltakit.engine.executor import Assembly
from deltakit.errors import DeltakitError, IncompatibleError
from deltakit.families import Part, TensorInfo
from deltakit.merge.config import (
    COMPUTE_DTYPES,
    OUT_DTYPES,
    MergeConfig,
    MergeConfigError,
    evaluate_setting,
)
from deltakit.merge.methods import Kernel
from deltakit.model import MappedCheckpoint, open_model
from deltakit.pairing import pair


@dataclass
class TensorJob:
    """What to do for one output tensor (an MLLM key).

    ``sources`` are ``(checkpoint, where)`` of the contributing models, ``base`` the base model's, both
    empty for a copy; ``where`` is the :class:`Part` holding this tensor (the MLLM's own key, or the
    canonical tensor in another model), or for a fused expert tensor of the MLLM the :class:`Assembly` of
    another model's experts in its layout. Rows ``[0, rows)`` are merged, ``[rows, shape[0])`` copied from the MLLM.
    """

    key: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    canonical: str | None = None
    sources: list[tuple[MappedCheckpoint, Part | Assembly]] = field(default_factory=list)
    base: tuple[MappedCheckpoint, Part | Assembly] | None = None
    rows: int = 0
    kernel: Kernel | None = None
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    @property
    def merged(self) -> bool:
        return self.kernel is not None

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class MergePlan:
    """The jobs of a merge plus what the report needs to say about it."""

    config: MergeConfig
    mllm: MappedCheckpoint
    inputs: dict[str, MappedCheckpoint]
    jobs: list[TensorJob]
    compute_dtype: torch.dtype
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        for m in self.inputs.values():
            m.ckpt.close()


def dare_seed(seed: int, canonical: str, index: int) -> int:
    """The random-drop seed of model ``index`` on tensor ``canonical``: stable across runs, threads and chunking."""
    digest = hashlib.blake2b(f"{seed}:{canonical}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def plan_merge(config: MergeConfig) -> MergePlan:
    """Open every input and build the per-tensor jobs; raises :class:`IncompatibleError` for tensors that cannot be merged."""
    inputs: dict[str, MappedCheckpoint] = {}
    entries = list(config.models) + ([config.base_model] if config.uses_base else [])
    try:
        for e in entries:
            if e.model not in inputs:
                inputs[e.model] = open_model(e.model, e.family)
        mllm_path = _choose_mllm(config, inputs)
        plan = MergePlan(config, inputs[mllm_path], inputs, [], COMPUTE_DTYPES[config.dtype])
        _build_jobs(plan, mllm_path)
    except BaseException:
        for m in inputs.values():
            m.ckpt.close()
        raise
    return plan


def _choose_mllm(config: MergeConfig, inputs: dict[str, MappedCheckpoint]) -> str:
    if config.mllm is not None:
        return config.mllm
    multimodal = [p for p in inputs if inputs[p].family.multimodal]
    if len(multimodal) > 1:
        raise MergeConfigError(f"several multimodal models ({', '.join(multimodal)}); say which one is the output's with mllm:")
    return multimodal[0] if multimodal else config.models[0].model


def _build_jobs(plan: MergePlan, mllm_path: str) -> None:
    config, mllm = plan.config, plan.mllm
    pairings = {path: pair(mllm, m) for path, m in plan.inputs.items() if path != mllm_path}
    matched = {path: {t.canonical: t for t in p.matched} for path, p in pairings.items()}
    mismatched = {path: {name: (sa, sb) for name, sa, sb in p.shape_mismatch} for path, p in pairings.items()}
    out_dtype = OUT_DTYPES[config.out_dtype] if config.out_dtype else None
    nonbase = config.non_base
    base_path = config.base_model.model if config.uses_base else None
    num_layers = mllm.num_layers
    if mllm.tied and "lm_head" in config.modules and "embed" not in config.modules:
        plan.notes.append(f"{mllm.path} ties lm_head to embed_tokens; lm_head is merged only with embed")
    sums: dict[float, str] = {}
    outside: dict[tuple[str, float], tuple[str, float, float | None]] = {}

    def locate(path: str, parts: dict[str, Part], key: str) -> tuple[Part | Assembly, int]:
        """Where input ``path`` holds the MLLM tensor ``key`` (made of ``parts``), and how many of its rows it shares."""
        shape = mllm.ckpt.meta(key).shape
        if path == mllm_path:
            return Part(key, shape), shape[0] if shape else 1
        found = []
        for canonical in parts:
            if canonical in mismatched[path]:
                sa, sb = mismatched[path][canonical]
                raise IncompatibleError(f"cannot merge {canonical}: shape {list(sa)} in {mllm.path} vs {list(sb)} in {path}")
            t = matched[path].get(canonical)
            if t is None:
                raise IncompatibleError(f"{path} has no {canonical} (needed for {mllm.path}'s {key}); narrow modules: or layers:")
            found.append(t)
        if len(parts) == 1 and next(iter(parts.values())).expert is None:
            t = found[0]
            return t.part_b, t.rows if t.rows is not None else t.shape_a[0]
        return Assembly(shape, tuple((parts[t.canonical], t.part_b) for t in found)), shape[0]

    for key in mllm.ckpt.keys():
        meta = mllm.ckpt.meta(key)
        info = mllm.infos[key]
        dtype = out_dtype if out_dtype is not None and meta.dtype.is_floating_point else meta.dtype
        job = TensorJob(key, meta.shape, dtype, info.canonical)
        plan.jobs.append(job)
        if info.role != "text":
            job.reason = info.role
            continue
        parts = mllm.parts_of(key) if info.kind == "experts" else {info.canonical: Part(key, meta.shape)}
        chosen = [c for c in parts if config.selection(c)]
        if not chosen:
            job.reason = "not selected"
            continue
        if len(chosen) < len(parts):
            raise MergeConfigError(f"{key} holds {len(parts)} expert tensors and the selection takes {len(chosen)} of them; a fused "
                                   f"expert tensor is merged or copied whole, so select all of its experts or none")
        located = [locate(e.model, parts, key) for e in nonbase]
        job.sources = [(plan.inputs[e.model], where) for e, (where, _) in zip(nonbase, located)]
        rows = [r for _, r in located]
        if base_path is not None:
            where, brows = locate(base_path, parts, key)
            job.base = (plan.inputs[base_path], where)
            rows.append(brows)
        job.rows = min(rows)
        if job.rows < meta.shape[0]:
            plan.notes.append(f"{info.canonical}: vocab sizes differ; merged rows [0, {job.rows}), rows [{job.rows}, {meta.shape[0]}) copied from the MLLM")
        names = (info.canonical, key)
        t = (info.layer / (num_layers - 1) if num_layers > 1 else 1.0) if info.layer is not None else 0.0
        job.params = _resolve(config, names, t, info, mllm_path)
        if config.spec.interpolates:
            total = sum(job.params["weight"])
            if abs(total - 1) > 1e-6:
                sums.setdefault(round(total, 6), (info.canonical, job.params["normalize"]))
            divided = job.params["normalize"] and abs(total) >= 1e-8  # as methods.linear divides
            for entry, w in zip(nonbase, job.params["weight"]):
                effective = w / total if divided else w
                if effective < -1e-9 or effective > 1 + 1e-9:
                    outside.setdefault((entry.model, round(effective, 6)),
                                       (info.canonical, w, total if divided and abs(total - 1) > 1e-6 else None))
        seeds = [dare_seed(config.seed, info.canonical, i) for i in range(len(nonbase))] if config.spec.rng else []
        if seeds:
            job.params["seeds"] = seeds
        try:
            job.kernel = config.spec.kernel(job.params, (job.rows, *meta.shape[1:]), len(nonbase), seeds)
            job.kernel.dtype, job.kernel.out_dtype = plan.compute_dtype, job.out_dtype
        except DeltakitError as exc:
            raise MergeConfigError(f"{info.canonical}: {exc}") from None
    for total, (name, normalize) in sums.items():
        how = "divided by their sum (normalize: true)" if normalize else "not normalized: the result is scaled"
        plan.warnings.append(f"{config.merge_method} weights sum to {total:g}, not 1 (e.g. on {name}); {how}")
    for (model, effective), (name, raw, divisor) in outside.items():
        how = f" ({raw:g} divided by the weights' sum {divisor:g})" if divisor is not None else ""
        plan.warnings.append(f"{config.merge_method} weight {effective:g}{how} on {model} is outside [0, 1] (e.g. on {name}): "
                             f"the merge extrapolates instead of interpolating")


def _resolve(config: MergeConfig, names: tuple[str, ...], t: float, info: TensorInfo, mllm_path: str) -> dict[str, Any]:
    """Every parameter's value for one tensor: per-model ones as lists (one per non-base model), shared ones as scalars."""
    spec = config.spec
    out: dict[str, Any] = {}
    for name, default in spec.shared_params.items():
        value = evaluate_setting(config.parameters.get(name, default), names, t)
        out[name] = default if value is None else value
        if out[name] is None:
            raise MergeConfigError(f"no {name!r} for {info.canonical} (no filter matched)")
    for name, default in spec.model_params.items():
        values = []
        for m in config.non_base:
            setting = m.parameters.get(name, config.parameters.get(name, default))
            value = evaluate_setting(setting, names, t)
            value = default if value is None else value
            if value is None:
                raise MergeConfigError(f"model {m.model} has no {name!r} for {info.canonical} (no filter matched)")
            values.append(float(value))
        out[name] = values
    if "keep_layers" in out and info.layer is not None and info.layer < out["keep_layers"]:
        out["weight"] = [1.0 if m.model == mllm_path else 0.0 for m in config.non_base]
    return out
