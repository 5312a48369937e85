"""One executor for every streaming command: tensor jobs cut into row blocks, run on reader threads.

A :class:`Job` says what to read (``(checkpoint, key)`` inputs, rows ``[start, stop)``, the dtype to read
them in) and what to compute per block; :func:`execute` runs the jobs' blocks on a thread pool in file
order (so a cold-cache read stays sequential), reading each block with ``pread`` into reused per-thread
buffers (:class:`~deltakit.io.reader.RowReader`). A block's ``compute`` may write rows into the plan's
output (:meth:`Block.write`, ``pwrite`` at fixed offsets) and return a value; the values come back per
job in block order, so a reduction over them is deterministic whatever the thread timing. A job whose
computation needs the whole tensor (TIES's top-k threshold, a low-rank factorisation) is one unit
(``whole=True``) that reads row ranges itself through the same :class:`Block`.

Torch runs single-threaded inside: the blocks are the parallelism.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from deltakit.io.checkpoint import Checkpoint
from deltakit.io.reader import RowReader, single_threaded_torch
from deltakit.progress import ProgressFn, no_progress

DEFAULT_BLOCK_ELEMENTS = 1 << 19
"""Elements per row block: 2 MB of float32, large enough that per-block overhead is small."""


class RowSink(Protocol):
    """Where blocks write: :class:`~deltakit.io.writer.ShardedWriter` or :class:`~deltakit.io.writer.SafetensorsWriter`."""

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class Read:
    """One input of a job: tensor ``key`` of ``ckpt``, read in ``dtype``."""

    ckpt: Checkpoint
    key: str
    dtype: torch.dtype


@dataclass
class Job:
    """The work on one tensor (or one row range of it).

    ``compute(block)`` is called for every row block of ``[start, stop)`` (``block_rows`` rows, or as
    many as fit ``block_elements``), or once for the whole range when ``whole``. ``row_elements`` is the
    number of elements per row (1 for a vector; a 0-d tensor is one row of one).
    """

    name: str
    reads: Sequence[Read]
    start: int
    stop: int
    row_elements: int
    compute: Callable[["Block"], Any]
    whole: bool = False
    block_rows: int | None = None

    @property
    def numel(self) -> int:
        return (self.stop - self.start) * self.row_elements

    def blocks(self, block_elements: int) -> list[tuple[int, int]]:
        """The ``(a, b)`` row blocks of this job (one block when ``whole``)."""
        if self.whole:
            return [(self.start, self.stop)]
        step = self.block_rows or max(1, block_elements // max(self.row_elements, 1))
        return [(a, min(a + step, self.stop)) for a in range(self.start, self.stop, step)]


class Block:
    """Rows ``[start, stop)`` of a job as seen by its ``compute``: read inputs, write outputs."""

    def __init__(self, job: Job, start: int, stop: int, reader: RowReader, sink: RowSink | None, block_elements: int):
        self.job, self.start, self.stop = job, start, stop
        self._reader, self._sink, self._block_elements = reader, sink, block_elements

    def read(self, i: int, a: int | None = None, b: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[a, b)`` (default: this block's) of input ``i``, valid until this thread reads input ``i`` again.

        The tensor is a reused buffer: do not modify it (compute out of place) and do not keep it.
        """
        r = self.job.reads[i]
        return self._reader.read(r.ckpt, r.key, self.start if a is None else a, self.stop if b is None else b,
                                 dtype or r.dtype, i)

    def write(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` as rows ``[row_start, ...)`` of output tensor ``name``."""
        self._sink.write_rows(name, row_start, rows)

    def sub_blocks(self) -> list[tuple[int, int]]:
        """Row blocks of this (whole) range, for a ``compute`` that streams it in several passes."""
        step = max(1, self._block_elements // max(self.job.row_elements, 1))
        return [(a, min(a + step, self.stop)) for a in range(self.start, self.stop, step)]


def default_threads() -> int:
    """Worker threads when none are asked for: one per core."""
    return os.cpu_count() or 1


def execute(jobs: Sequence[Job], sink: RowSink | None = None, *, threads: int | None = None,
            block_elements: int = DEFAULT_BLOCK_ELEMENTS, progress: ProgressFn = no_progress,
            description: str = "working") -> list[list[Any]]:
    """Run every block of ``jobs``; returns, per job, the values its ``compute`` returned, in block order.

    Whole-tensor jobs start first, largest first (so a long one does not finish last alone), then row
    blocks in job order. The first exception in any block cancels the rest and is raised here.
    """
    threads = threads or default_threads()
    whole = sorted((j for j in range(len(jobs)) if jobs[j].whole), key=lambda j: -jobs[j].numel)
    order = whole + [j for j in range(len(jobs)) if not jobs[j].whole]
    results: list[list[Any]] = [[] for _ in jobs]
    reader = RowReader()
    progress(0, total=sum(j.numel for j in jobs), description=description)

    def run(job: Job, a: int, b: int) -> tuple[Any, int]:
        return job.compute(Block(job, a, b, reader, sink, block_elements)), (b - a) * job.row_elements

    with single_threaded_torch():
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deltakit")
        try:
            futures = []
            for j in order:
                blocks = jobs[j].blocks(block_elements)
                results[j] = [None] * len(blocks)
                futures += [(j, k, pool.submit(run, jobs[j], a, b)) for k, (a, b) in enumerate(blocks)]
            by_future = {f: (j, k) for j, k, f in futures}
            pending = set(by_future)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                for f in done:
                    value, numel = f.result()
                    j, k = by_future[f]
                    results[j][k] = value
                    progress(numel, info=jobs[j].name)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            reader.close()
    return results
