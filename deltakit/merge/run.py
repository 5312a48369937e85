"""Running a merge plan: stream every output tensor through a thread pool into an atomic sharded output.

Work is cut into units: a row block of one tensor (a DARE block for ``dare_*``), or a whole tensor for
``ties``, whose top-k threshold is defined per tensor (found from a sample and one streaming scan).
Units run largest first. Each reads its rows with ``pread`` into reused per-thread buffers, computes in
the compute dtype, casts and writes with ``pwrite`` at the tensor's fixed offset, so reads, compute and
writes of different units overlap across threads and resident memory stays at a few row blocks per
thread. Copies move raw bytes (no dtype round trip)."""

from __future__ import annotations

import contextlib
import json
import math
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltakit import __version__
from deltakit.io.reader import RowReader, single_threaded_torch
from deltakit.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, TensorSpec, atomic_output_dir, check_output_free
from deltakit.merge.config import MergeConfig, MergeConfigError
from deltakit.merge import methods
from deltakit.merge.plan import MergePlan, TensorJob, plan_merge
from deltakit.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMENTS = 1 << 19
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


def merge(config: MergeConfig | str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
          progress: ProgressFn = no_progress, threads: int | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> MergeReport:
    """Merge the text towers of ``config``'s models into a copy of the MLLM written to ``out``.

    ``config`` is a :class:`MergeConfig` or the path of a YAML recipe. The output folder has the MLLM's
    keys, layout and non-weight files (config, tokenizer, processor, chat template), sharded safetensors
    with an index, ``merge_report.json`` and a ``README.md`` model card; it appears only when complete.
    Raises :class:`deltakit.errors.DeltakitError` subclasses for bad input.
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
                _execute(plan, writer, threads or os.cpu_count() or 1, chunk_elements, progress)
            _copy_files(plan, tmp)
            report = _report(plan, out, time.perf_counter() - start, sum(s.nbytes for s in specs))
            (tmp / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            (tmp / CARD_NAME).write_text(model_card(report, config))
    finally:
        plan.close()
    report.seconds = time.perf_counter() - start
    return report


def _blocks(n: int, step: int, start: int = 0) -> list[tuple[int, int]]:
    return [(a, min(a + step, n)) for a in range(start, n, step)]


def _units(job: TensorJob, plan: MergePlan, chunk_elements: int) -> list[tuple[int, int, bool]]:
    """``(row_start, row_stop, merge?)`` work units covering the tensor; a ``ties`` tensor's merged rows are one unit."""
    n = job.shape[0] if job.shape else 1
    step = max(1, chunk_elements // _row_elements(job))
    merged = job.rows if job.merged else 0
    if merged and plan.config.merge_method == "ties":
        units = [(0, merged, True)]
    else:
        mstep = methods.dare_block_rows(job.shape) if plan.config.merge_method.startswith("dare") else step
        units = [(a, b, True) for a, b in _blocks(merged, mstep)]
    return units + [(a, b, False) for a, b in _blocks(n, step, merged)]


def _row_elements(job: TensorJob) -> int:
    return math.prod(job.shape[1:])


def _release(job: TensorJob, a: int, b: int) -> None:
    for m, k in job.sources + ([job.base] if job.base else []):
        m.ckpt.release(k, a, b)


def _run_ties(plan: MergePlan, writer: ShardedWriter, reader: RowReader, job: TensorJob, rows: int,
              chunk_elements: int) -> None:
    """Stream one TIES tensor: scan(s) to find each delta's exact top-k threshold, then trim, elect and write."""
    cd = plan.compute_dtype
    blocks = _blocks(rows, max(1, chunk_elements // _row_elements(job)))
    base_sample = methods.sample(job.base[0].ckpt.rows(job.base[1], 0, rows)).to(cd)
    tops = [methods.TopK(methods.sample(m.ckpt.rows(k, 0, rows)).to(cd) - base_sample, rows * _row_elements(job), rho)
            for (m, k), rho in zip(job.sources, job.params["density"])]
    _release(job, 0, rows)  # sampling faulted in mapped pages around the sampled rows
    while not all(t.done for t in tops):
        for a, b in blocks:
            base = reader.read(job.base[0].ckpt, job.base[1], a, b, cd, "base")
            for i, (ref, top) in enumerate(zip(job.sources, tops)):
                if not top.done:
                    top.observe((reader.read(ref[0].ckpt, ref[1], a, b, cd, i) - base).abs_())
        for top in tops:
            if not top.done:
                top.finish()
    for a, b in blocks:
        base = reader.read(job.base[0].ckpt, job.base[1], a, b, cd, "base")
        deltas = []
        for i, (ref, top) in enumerate(zip(job.sources, tops)):
            d = reader.read(ref[0].ckpt, ref[1], a, b, cd, i) - base
            keep = top.keep(d.abs())
            deltas.append(d if keep is None else d.mul_(keep))
        writer.write_rows(job.key, a, job.compute(base, deltas, a).to(job.out_dtype))


def _run_unit(plan: MergePlan, writer: ShardedWriter, reader: RowReader, job: TensorJob, a: int, b: int,
              do_merge: bool, chunk_elements: int) -> int:
    if not job.shape:
        writer.write(job.key, plan.mllm.ckpt.get(job.key).to(job.out_dtype))
        return job.nbytes
    if do_merge and plan.config.merge_method == "ties":
        _run_ties(plan, writer, reader, job, b, chunk_elements)
    elif do_merge:
        cd = plan.compute_dtype
        tensors = [reader.read(ref[0].ckpt, ref[1], a, b, cd, i) for i, ref in enumerate(job.sources)]
        base = reader.read(job.base[0].ckpt, job.base[1], a, b, cd, "base") if job.base else None
        writer.write_rows(job.key, a, job.compute(base, tensors, a).to(job.out_dtype))
    else:
        writer.write_rows(job.key, a, reader.read(plan.mllm.ckpt, job.key, a, b, job.out_dtype, "copy"))
    return (b - a) * _row_elements(job) * job.out_dtype.itemsize


def _execute(plan: MergePlan, writer: ShardedWriter, threads: int, chunk_elements: int, progress: ProgressFn) -> None:
    """Run every unit on ``threads`` workers, largest first (so one big tensor does not finish last alone).

    With several workers each runs its tensor operations single-threaded: the units are the parallelism,
    and nested intra-op threads would only contend for the same cores.
    """
    reader = RowReader()
    units: list[tuple[int, Callable[[], int]]] = []
    for job in plan.jobs:
        for a, b, do_merge in _units(job, plan, chunk_elements):
            size = (b - a) * _row_elements(job) if job.shape else 1
            units.append((size, lambda job=job, a=a, b=b, m=do_merge: _run_unit(plan, writer, reader, job, a, b, m,
                                                                                 chunk_elements)))
    units.sort(key=lambda u: -u[0])
    progress(0, total=sum(j.nbytes for j in plan.jobs), description=f"merge ({plan.config.merge_method})")
    with single_threaded_torch() if threads > 1 else contextlib.nullcontext():
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deltakit-merge")
        try:
            pending = {pool.submit(u) for _, u in units}
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                for f in done:
                    progress(f.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            reader.close()


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
    if cfg.spec.needs_base:
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
