"""One executor for every streaming command: tensor jobs cut into row blocks, run on reader threads.

A :class:`Job` says what to read (``(checkpoint, key)`` inputs, rows ``[start, stop)``, the dtype to read
them in) and what to compute per block; :func:`execute` runs the jobs' blocks on worker threads in file
order (so a cold-cache read stays sequential), reading each block with ``pread`` into reused per-thread
buffers (:class:`~deltakit.io.reader.RowReader`). A block's ``compute`` may write rows into the plan's
output (:meth:`Block.write`, ``pwrite`` at fixed offsets) and return a value; the values come back per
job in block order, so a reduction over them is deterministic whatever the thread timing. A job whose
computation needs the whole tensor (TIES's top-k threshold, a low-rank factorisation) is one unit
(``whole=True``) that reads row ranges itself through the same :class:`Block`.

Torch runs single-threaded inside: the blocks are the parallelism.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from deltakit.families import Part
from deltakit.io.checkpoint import Checkpoint, TensorMeta
from deltakit.io.reader import RowReader, single_threaded_torch
from deltakit.model import part_of
from deltakit.progress import ProgressFn, no_progress

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
DEFAULT_BLOCK_ELEMENTS = 1 << 19
"""Elements per row block: 2 MB of float32, large enough that per-block overhead is small."""
DEFAULT_KEEP_BYTES = 1 << 30
"""Bytes of row blocks the whole-tensor units may keep between their passes (:meth:`Block.kept`), all threads together."""


class RowSink(Protocol):
    """Where blocks write: :class:`~deltakit.io.writer.ShardedWriter` or :class:`~deltakit.io.writer.SafetensorsWriter`."""

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class Assembly:
    """A stored fused expert tensor of one model (``shape`` [E, X, Y]) rebuilt from another checkpoint's parts.

    ``pieces`` pairs each canonical tensor's place in the target (a :class:`~deltakit.families.Part` of
    the target key) with where the other checkpoint stores it; rows of an assembly are experts. A merge
    reads its partners this way when the MLLM's experts are fused and theirs are not (or transposed).
    """

    shape: tuple[int, ...]
    pieces: tuple[tuple[Part, Part], ...]


@dataclass(frozen=True)
class Read:
    """One input of a job: tensor ``key`` of ``ckpt`` read in ``dtype``; with ``part``, the rows of a canonical
    tensor held in a fused one (:class:`~deltakit.families.Part`) or an :class:`Assembly`."""

    ckpt: Checkpoint
    key: str
    dtype: torch.dtype
    part: Part | Assembly | None = None

    @classmethod
    def of(cls, ckpt: Checkpoint, part: Part, dtype: torch.dtype) -> "Read":
        """The read of canonical tensor ``part`` (a plain key read when it is a whole stored tensor)."""
        return cls(ckpt, part.key, dtype, part if part.expert is not None else None)


def _plain(r: Read) -> TensorMeta | None:
    """The metadata of ``r``'s tensor when it is a whole tensor stored in a safetensors file (read straight into a
    buffer), else ``None`` (a part of a fused tensor, an assembly, a pickled checkpoint)."""
    meta = r.ckpt.meta(r.key) if r.part is None else None
    return meta if meta is not None and meta.file != "pickle" else None


def whole_rows(reads: Sequence[Read]) -> int | None:
    """``block_rows`` for a job over ``reads``: a transposed part is read whole (its rows are columns on disk)."""
    rows = [r.part.shape[0] for r in reads if isinstance(r.part, Part) and r.part.transposed]
    return max(rows) if rows else None


def read_part(reader: RowReader, ckpt: Checkpoint, part: Part | Assembly, a: int, b: int, dtype: torch.dtype,
              slot: object) -> torch.Tensor:
    """Rows ``[a, b)`` of a canonical part (or experts ``[a, b)`` of an assembly) in ``dtype``."""
    if isinstance(part, Assembly):
        out = reader.buffer(("assembly", slot), (b - a, *part.shape[1:]), dtype)
        for target, source in part.pieces:
            if a <= target.expert < b:
                value = read_part(reader, ckpt, source, 0, source.shape[0], dtype, ("piece", slot)) \
                    if source.expert is not None else reader.read(ckpt, source.key, 0, source.shape[0], dtype, ("piece", slot))
                m = out[target.expert - a]
                rows = target.shape[0]
                (m[:, target.offset:target.offset + rows] if target.transposed else m[target.offset:target.offset + rows]) \
                    .copy_(value.t() if target.transposed else value)
        return out
    meta = ckpt.meta(part.key)
    if meta.file == "pickle":
        return part_of(ckpt.get(part.key), part)[a:b].to(dtype)
    _, x, y = meta.shape
    if not part.transposed:
        return reader.read_elements(ckpt, part.key, (part.expert * x + part.offset + a) * y, (b - a, y), dtype, slot)
    slab = reader.read_elements(ckpt, part.key, part.expert * x * y, (x, y), meta.dtype, slot)
    out = reader.buffer(("transposed", slot), (b - a, x), dtype)
    return out.copy_(slab[:, part.offset + a:part.offset + b].t())


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

    def __init__(self, job: Job, start: int, stop: int, reader: RowReader, sink: RowSink | None, block_elements: int,
                 keep_bytes: int = 0):
        self.job, self.start, self.stop = job, start, stop
        self._reader, self._sink, self._block_elements, self._keep_bytes = reader, sink, block_elements, keep_bytes

    def read(self, i: int, a: int | None = None, b: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[a, b)`` (default: this block's) of input ``i``, valid until this thread reads input ``i`` again.

        The tensor is a reused buffer: do not modify it (compute out of place) and do not keep it.
        """
        r = self.job.reads[i]
        a, b = self.start if a is None else a, self.stop if b is None else b
        if r.part is None:
            return self._reader.read(r.ckpt, r.key, a, b, dtype or r.dtype, i)
        return read_part(self._reader, r.ckpt, r.part, a, b, dtype or r.dtype, i)

    def read_all(self, row_shape: tuple[int, ...], a: int | None = None, b: int | None = None,
                 kept: torch.Tensor | None = None, filled: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[a, b)`` (default: this block's) of every input, stacked: ``[len(reads), b - a, *row_shape]`` in
        ``dtype`` (default: the first input's read dtype; :meth:`stored_dtype` reads the bytes as stored, unconverted),
        valid until this thread's next ``read_all``. Plain stored tensors are read straight into their slot.

        With ``kept`` (a buffer of :meth:`kept`) the rows are read into it, unless ``filled`` (they were read there
        before), and returned from it: the buffer itself, or converted into a reused one when it holds another dtype.
        """
        reads = self.job.reads
        dtype = dtype or reads[0].dtype
        a, b = self.start if a is None else a, self.stop if b is None else b
        shape = (b - a, *row_shape)
        target = kept if kept is not None else self._reader.buffer("stack", (len(reads), *shape), dtype)
        if not (kept is not None and filled):
            for i, r in enumerate(reads):
                meta = _plain(r)
                if meta is not None:
                    self._reader.read_elements(r.ckpt, r.key, a * math.prod(meta.shape[1:]), shape, target.dtype, i,
                                               out=target[i])
                else:
                    target[i].copy_(self.read(i, a, b).reshape(shape))
        if target.dtype == dtype:
            return target
        return self._reader.buffer("stack", tuple(target.shape), dtype).copy_(target)

    def stored_dtype(self) -> torch.dtype | None:
        """The one dtype every input is stored in, when all are plain stored tensors (read straight into a buffer)."""
        stored = {None if (meta := _plain(r)) is None else meta.dtype for r in self.job.reads}
        return stored.pop() if len(stored) == 1 else None

    def _keep_dtype(self) -> torch.dtype:
        """The dtype :meth:`kept` blocks hold: the inputs' :meth:`stored_dtype` when it is narrower than the read one
        (each is read once and converted on every use, so twice as many bf16 blocks fit as float32 ones), else the
        read dtype."""
        dtype, only = self.job.reads[0].dtype, self.stored_dtype()
        return only if only is not None and only.itemsize < dtype.itemsize else dtype

    def kept(self, blocks: Sequence[tuple[int, int]], row_shape: tuple[int, ...]) -> list[torch.Tensor | None]:
        """Buffers to keep the stacked inputs of the first of ``blocks`` for a later pass (:meth:`read_all` with
        ``kept``), in :meth:`_keep_dtype`: as many as fit this thread's share of the executor's ``keep_bytes``
        (``None`` for the rest). They are this thread's, reused by its next unit, so a unit that passes over a
        tensor twice reads the kept blocks once and faults no new memory.
        """
        dtype = self._keep_dtype()
        out: list[torch.Tensor | None] = []
        used = 0
        for k, (a, b) in enumerate(blocks):
            shape = (len(self.job.reads), b - a, *row_shape)
            used += math.prod(shape) * dtype.itemsize
            if used > self._keep_bytes:
                break
            out.append(self._reader.buffer(("kept", k), shape, dtype))
        return out + [None] * (len(blocks) - len(out))

    def write(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` as rows ``[row_start, ...)`` of output tensor ``name``."""
        self._sink.write_rows(name, row_start, rows)

    def sub_blocks(self) -> list[tuple[int, int]]:
        """Row blocks of this (whole) range, for a ``compute`` that streams it in several passes."""
        step = max(1, self._block_elements // max(self.job.row_elements, 1))
        return [(a, min(a + step, self.stop)) for a in range(self.start, self.stop, step)]


@functools.cache
def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks of up to 32 MB in the heap instead of handing them back to the kernel.

    Every row block allocates a few temporaries of a few MB; by default glibc serves such sizes with
    ``mmap`` or trims them off the heap when freed, so each block page-faults its memory in again: on the
    prior export of a 0.5B pair that was 726K page faults and 4.3 s of system time for 7.8 s of wall
    (35K faults, 1.4 s and 6.7 s with this). Process-wide and harmless elsewhere (the heap keeps a few
    blocks' worth); a no-op without glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 512 << 20)


def default_threads() -> int:
    """Worker threads when none are asked for: one per core. More only contend for the GIL, which every torch op
    of a block takes again: two per core made each of the nine merge methods measured slower (docs/benchmarks.md, "merge")."""
    return os.cpu_count() or 1


def execute(jobs: Sequence[Job], sink: RowSink | None = None, *, threads: int | None = None,
            block_elements: int = DEFAULT_BLOCK_ELEMENTS, keep_bytes: int = DEFAULT_KEEP_BYTES,
            progress: ProgressFn = no_progress, description: str = "working") -> list[list[Any]]:
    """Run every block of ``jobs``; returns, per job, the values its ``compute`` returned, in block order.

    Whole-tensor jobs start first, largest first (so a long one does not finish last alone), then row
    blocks in job order. Worker threads take the next block from one shared queue (no future per
    block: at 7B there are tens of thousands); the calling thread only reports progress, so a signal
    reaches it at once. The first exception in any block, or in the calling thread (Ctrl-C), stops the
    workers after their current block and is raised here.
    """
    keep_freed_memory()
    threads = threads or default_threads()
    share = keep_bytes // threads
    whole = sorted((j for j in range(len(jobs)) if jobs[j].whole), key=lambda j: -jobs[j].numel)
    order = whole + [j for j in range(len(jobs)) if not jobs[j].whole]
    results: list[list[Any]] = [[] for _ in jobs]
    units: list[tuple[int, int, int, int]] = []
    for j in order:
        blocks = jobs[j].blocks(block_elements)
        results[j] = [None] * len(blocks)
        units += [(j, k, a, b) for k, (a, b) in enumerate(blocks)]
    reader = RowReader()
    queue = iter(units)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0] * threads
    current = [""]

    def work(slot: int) -> None:
        try:
            while not stop.is_set():
                with lock:
                    unit = next(queue, None)
                if unit is None:
                    return
                j, k, a, b = unit
                job = jobs[j]
                current[0] = job.name
                results[j][k] = job.compute(Block(job, a, b, reader, sink, block_elements, share))
                done[slot] += (b - a) * job.row_elements
        except BaseException as exc:  # handed to the calling thread, which raises it
            errors.append(exc)
            stop.set()
        finally:
            with lock:
                running[0] -= 1
                if not running[0]:
                    finished.set()

    progress(0, total=sum(j.numel for j in jobs), description=description)
    # The calling thread waits on an Event (a signal interrupts it cleanly; an interrupted Thread.join is
    # not safe), reports progress, and on any exception stops the workers after their current block.
    workers = [threading.Thread(target=work, args=(i,), name=f"deltakit-{i}") for i in range(threads)]
    finished = threading.Event()
    running = [len(workers)]
    reported = 0

    def report() -> None:
        nonlocal reported
        now = sum(done)
        if now > reported:
            progress(now - reported, info=current[0])
            reported = now

    with single_threaded_torch():
        try:
            for w in workers:
                w.start()
            while not finished.wait(0.2):
                report()
            report()
        finally:
            stop.set()
            while not finished.wait(0.1) and any(w.is_alive() for w in workers):
                pass  # a worker never started (a signal inside Thread.start) does not count down
            reader.close()
    if errors:
        raise errors[0]
    return results
