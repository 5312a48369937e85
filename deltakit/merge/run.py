"""Running a merge plan on the streaming engine, into an atomic sharded output.

:func:`engine_jobs` turns the plan into engine jobs: independent row blocks of one tensor (the fixed
random blocks of a method that draws masks), or one unit per tensor for a kernel that needs a
whole-tensor statistic first (TIES's top-k threshold, SLERP's angle, Model Stock's cosines, SCE's
variance and weights, a DARE/DELLA L1 rescale), which scans the tensor's row blocks and then writes them. :func:`deltakit.engine.executor.execute` runs them: rows read with
``pread`` into reused per-thread buffers, computed in the compute dtype, cast and written with
``pwrite`` at the tensor's fixed offset, so reads, compute and writes of different blocks overlap
across threads and resident memory stays at a few row blocks per thread. Copies move raw bytes (no
dtype round trip)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from deltakit import __version__
from deltakit.engine import fused
from deltakit.engine.executor import (
    DEFAULT_KEEP_BYTES,
    Assembly,
    Block,
    Job,
    Read,
    execute,
    whole_rows,
)
from deltakit.families import Part
from deltakit.io.writer import (
    DEFAULT_SHARD_BYTES,
    ShardedWriter,
    TensorSpec,
    atomic_output_dir,
    check_output_free,
)
from deltakit.merge import methods
from deltakit.merge.config import MergeConfig, MergeConfigError
from deltakit.merge.plan import MergePlan, TensorJob, plan_merge
from deltakit.model import MappedCheckpoint
from deltakit.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"
CARD_NAME = "README.md"
_SKIP_FILES = (REPORT_NAME, CARD_NAME)


@dataclass
class TensorAction:
    """What was done to one output tensor."""

    key: str
    canonical: str | None
    action: str
    dtype: str
    shape: list[int]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeReport:
    """The result of :func:`merge` (also written to ``merge_report.json`` in the output folder)."""

    out: Path
    method: str
    mllm: str
    inputs: list[dict[str, Any]]
    config: dict[str, Any]
    tensors: list[TensorAction]
    warnings: list[str]
    notes: list[str]
    seconds: float
    bytes_written: int
    deltakit_version: str = __version__

    @property
    def merged(self) -> int:
        return sum(1 for t in self.tensors if t.action != "copied")

    @property
    def copied(self) -> int:
        return sum(1 for t in self.tensors if t.action == "copied")

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "method": self.method, "mllm": self.mllm, "inputs": self.inputs,
            "config": self.config, "merged": self.merged, "copied": self.copied, "warnings": self.warnings,
            "notes": self.notes, "seconds": round(self.seconds, 3), "bytes_written": self.bytes_written,
            "deltakit_version": self.deltakit_version,
            "tensors": [t.__dict__ for t in self.tensors],
        }


MERGE_BLOCK_ELEMENTS = 1 << 20
"""Elements per row block of a merge (4 MB of float32), twice the engine's default: each block runs several torch
ops per input, each taking the GIL again, and fewer, larger blocks made linear, nuslerp, model_stock and karcher
7-14% faster at 0.5B (TIES and Breadcrumbs 7-9% slower: docs/benchmarks.md, "merge")."""


def merge(config: MergeConfig | str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
          progress: ProgressFn = no_progress, threads: int | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, block_elements: int = MERGE_BLOCK_ELEMENTS,
          keep_bytes: int = DEFAULT_KEEP_BYTES) -> MergeReport:
    """Merge the text towers of ``config``'s models into a copy of the MLLM written to ``out``.

    ``config`` is a :class:`MergeConfig` or the path of a YAML recipe. The output folder has the MLLM's
    keys, layout and non-weight files (config, tokenizer, processor, chat template), sharded safetensors
    with an index, ``merge_report.json`` and a ``README.md`` model card; it appears only when complete.
    ``keep_bytes`` bounds the row blocks that methods with a whole-tensor statistic keep in memory between their
    passes (the rest are read twice). Raises :class:`deltakit.errors.DeltakitError` subclasses for bad input.
    """
    if not isinstance(config, MergeConfig):
        config = MergeConfig.from_yaml(config)
    out = check_output_free(out, force)
    inputs = [m.model for m in config.models] + ([config.base_model.model] if config.base_model else [])
    if any(Path(p).absolute() == out.absolute() for p in inputs):
        raise MergeConfigError(f"{out}: the output would replace one of the inputs")
    start = time.perf_counter()
    plan = plan_merge(config)
    try:
        for w in plan.warnings:
            log.warning(w)
        specs = [TensorSpec(j.key, j.out_dtype, j.shape) for j in plan.jobs]
        with atomic_output_dir(out, overwrite=force) as tmp:
            with ShardedWriter(tmp, specs, max_shard_bytes, metadata={"merged_by": f"deltakit {__version__}"}) as writer:
                execute(engine_jobs(plan), writer, threads=threads, block_elements=block_elements, keep_bytes=keep_bytes, progress=progress,
                        description=f"merge ({config.merge_method})")
            _copy_files(plan, tmp)
            report = _report(plan, out, time.perf_counter() - start, sum(s.nbytes for s in specs))
            (tmp / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            (tmp / CARD_NAME).write_text(model_card(report, config))
    finally:
        plan.close()
    report.seconds = time.perf_counter() - start
    return report


def engine_jobs(plan: MergePlan) -> list[Job]:
    """The merge plan as engine jobs: merged rows ``[0, rows)`` and copied rows ``[rows, n)`` of every output tensor.

    A merged range reads every source (and the base) in the compute dtype and writes the kernel's rows cast
    to the output dtype. A kernel that needs whole-tensor statistics first (``sample`` or ``scanning()``)
    is one unit that streams the range itself (:func:`_tensor_unit`); any other is cut into independent
    row blocks: the method's fixed random blocks when it draws masks (``spec.rng``), a vector whole (its
    rows are its entries). A copied range moves the MLLM's raw bytes (no dtype round trip).
    """
    jobs: list[Job] = []
    rng = plan.config.spec.rng
    cd = plan.compute_dtype
    for job in plan.jobs:
        n = job.shape[0] if job.shape else 1
        per_row = math.prod(job.shape[1:])
        merged = job.rows if job.merged and job.shape else 0
        if merged:
            reads = [_read(m, where, job.key, cd) for m, where in job.sources + ([job.base] if job.base else [])]
            if job.kernel.sample or job.kernel.scanning():
                jobs.append(Job(job.key, reads, 0, merged, per_row, partial(_tensor_unit, job), whole=True))
            else:
                rows = merged if len(job.shape) == 1 else methods.dare_block_rows(job.shape) if rng else whole_rows(reads)
                jobs.append(Job(job.key, reads, 0, merged, per_row, partial(_merge_rows, job), block_rows=rows))
        if merged < n:
            jobs.append(Job(job.key, [Read(plan.mllm.ckpt, job.key, job.out_dtype)], merged, n, per_row, partial(_copy_rows, job)))
    return jobs


def _read(m: MappedCheckpoint, where: Part | Assembly, key: str, dtype: torch.dtype) -> Read:
    """The engine input of one source: a part of its own checkpoint, or an assembly in the MLLM's layout."""
    return Read(m.ckpt, key, dtype, where) if isinstance(where, Assembly) else Read.of(m.ckpt, where, dtype)


def _sample(job: TensorJob, block: Block, i: int) -> torch.Tensor:
    """:func:`methods.sample` of input ``i``'s merged rows, reading only the sampled ones (a row of a fused
    expert tensor is a whole expert). The positions depend only on the shape, so deltas of samples are
    samples of deltas."""
    shape = (block.stop - block.start, *job.shape[1:])
    return methods.sample(lambda a, b: block.read(i, block.start + a, block.start + b), shape)


def _split(job: TensorJob, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The base's rows and the sources' (``[sources, rows, ...]``) of a stacked read (:meth:`Block.read_all`)."""
    n = len(job.sources)
    return (x[n] if job.base else None), x[:n]


def _stored(job: TensorJob, block: Block) -> torch.dtype | None:
    """The dtype to read a block's inputs in: as stored, unconverted, when the kernel is fused and the C kernels take
    that dtype (:func:`deltakit.engine.fused.reads`) for a float32 merge; else ``None``, the compute dtype."""
    stored = block.stored_dtype()
    return stored if job.kernel.fused and job.kernel.dtype == torch.float32 and fused.reads(stored) else None


def _merge_rows(job: TensorJob, block: Block) -> None:
    base, tensors = _split(job, block.read_all(job.shape[1:], dtype=_stored(job, block)))
    block.write(job.key, block.start, job.kernel.rows(block.start, base, tensors).to(job.out_dtype))


def _copy_rows(job: TensorJob, block: Block) -> None:
    rows = block.read(0)
    block.write(job.key, block.start, rows if job.shape else rows.reshape(()))


def _tensor_unit(job: TensorJob, block: Block) -> None:
    """One tensor whose kernel needs whole-tensor statistics: samples, statistic scans over its row blocks in
    order (as many as the kernel asks for), then its rows. The first scan keeps the blocks that fit this thread's
    share of memory (:meth:`Block.kept`) for the later passes; the others are read again (from the page cache)."""
    kernel, n = job.kernel, len(job.sources)
    step = methods.dare_block_rows(job.shape) if kernel.seeds else None
    blocks = [(a, min(a + step, block.stop)) for a in range(block.start, block.stop, step)] if step else block.sub_blocks()
    if kernel.sample:
        kernel.prepare(_sample(job, block, n) if job.base else None, [_sample(job, block, i) for i in range(n)])
    kept = block.kept(blocks, job.shape[1:]) if kernel.scanning() else [None] * len(blocks)
    filled = [False] * len(blocks)
    dtype = _stored(job, block)

    def inputs(k: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        x = block.read_all(job.shape[1:], *blocks[k], kept=kept[k], filled=filled[k], dtype=dtype)
        filled[k] = kept[k] is not None
        return _split(job, x)

    while kernel.scanning():
        for k, (a, _) in enumerate(blocks):
            kernel.observe(a, *inputs(k))
        kernel.end_scan()
    for k, (a, _) in enumerate(blocks):
        block.write(job.key, a, kernel.rows(a, *inputs(k)).to(job.out_dtype))


def _copy_files(plan: MergePlan, folder: Path) -> None:
    """Copy the MLLM's config, generation config, tokenizer, processor and template files; fix the dtype if changed."""
    for f in plan.mllm.ckpt.non_weight_files():
        if f.name not in _SKIP_FILES:
            shutil.copy2(f, folder / f.name)
    if plan.config.out_dtype and (folder / "config.json").exists():
        cfg = json.loads((folder / "config.json").read_text())
        for section in (cfg, cfg.get("text_config")):
            for k in ("torch_dtype", "dtype"):
                if isinstance(section, dict) and k in section:
                    section[k] = plan.config.out_dtype
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _report(plan: MergePlan, out: Path, seconds: float, nbytes: int) -> MergeReport:
    tensors = []
    for j in plan.jobs:
        if not j.merged:
            action = "copied"
        elif j.rows < j.shape[0]:
            action = f"merged rows [0, {j.rows}), rest copied"
        else:
            action = "merged"
        params = {k: v for k, v in j.params.items()} if j.merged else {}
        tensors.append(TensorAction(j.key, j.canonical, action, str(j.out_dtype).removeprefix("torch."), list(j.shape), params))
    roles = {}
    cfg = plan.config
    for m in cfg.models:
        roles.setdefault(m.model, "model")
    if cfg.uses_base:
        roles[cfg.base_model.model] = "base" if cfg.base_model.model not in roles else "model+base"
    mllm_path = str(plan.mllm.path)
    inputs = [{"path": p, "family": plan.inputs[p].family.name, "role": r + ("+mllm" if str(plan.inputs[p].path) == mllm_path else "")}
              for p, r in roles.items()]
    return MergeReport(out, cfg.merge_method, mllm_path, inputs, cfg.to_dict(), tensors, list(plan.warnings),
                       list(plan.notes), seconds, nbytes)


def model_card(report: MergeReport, config: MergeConfig) -> str:
    """A README.md model card: what was merged, how, and the exact config."""
    lines = [
        f"# {report.out.name}",
        "",
        f"Merged with `deltakit merge` (deltakit {report.deltakit_version}), method **{report.method}**.",
        f"The output keeps the layout, vision tower, projector and non-weight files of `{report.mllm}`;",
        f"{report.merged} text-tower tensors were merged and {report.copied} copied byte for byte.",
        "",
        "## Inputs",
        "",
        *[f"- `{i['path']}` ({i['family']}, {i['role']})" for i in report.inputs],
        "",
        "## Configuration",
        "",
        "```yaml",
        config.to_yaml().rstrip(),
        "```",
    ]
    if report.warnings or report.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report.warnings + report.notes]]
    return "\n".join(lines) + "\n"
