"""Reading row ranges of checkpoint tensors with ``pread`` into reused per-thread buffers (merge, diff)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from math import prod

import torch

from deltakit.errors import CheckpointError
from deltakit.io.checkpoint import Checkpoint


class RowReader:
    """Reads row ranges of input tensors with ``pread`` into per-thread buffers that are reused.

    Cheaper than faulting memory-mapped pages in and dropping them again (no page faults, nothing stays
    mapped, no allocation per block). A returned tensor is valid until the same thread reads into the
    same ``slot`` again, and must not be modified.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def read(self, ckpt: Checkpoint, key: str, a: int, b: int, dtype: torch.dtype, slot: object) -> torch.Tensor:
        """Rows ``[a, b)`` of tensor ``key`` of ``ckpt`` in ``dtype`` (a 0-d tensor has the one row ``[0, 1)``)."""
        meta = ckpt.meta(key)
        if meta.file == "pickle":
            return ckpt.rows(key, a, b).to(dtype)
        row = prod(meta.shape[1:])
        return self.read_elements(ckpt, key, a * row, (b - a, *meta.shape[1:]), dtype, slot)

    def read_elements(self, ckpt: Checkpoint, key: str, first: int, shape: tuple[int, ...], dtype: torch.dtype,
                      slot: object, out: torch.Tensor | None = None) -> torch.Tensor:
        """``prod(shape)`` consecutive elements of ``key`` from element ``first``, as ``shape`` in ``dtype``
        (into ``out``, a contiguous tensor of that shape and dtype, when given)."""
        meta = ckpt.meta(key)
        count = prod(shape)
        if first < 0 or first + count > meta.numel:
            raise CheckpointError(f"{key}: elements [{first}, {first + count}) outside its {meta.numel}")
        offset = meta.offset + first * meta.dtype.itemsize
        if out is not None and meta.dtype == dtype:
            self._pread(meta.file, out.reshape(-1).view(torch.uint8), offset)
            return out
        raw = self._buffer(("raw", slot), count * meta.dtype.itemsize, torch.uint8)
        self._pread(meta.file, raw, offset)
        rows = raw.view(meta.dtype).reshape(shape)
        if meta.dtype == dtype and out is None:
            return rows
        return (self._buffer(("cast", slot), count, dtype).reshape(shape) if out is None else out).copy_(rows)

    def buffer(self, name: object, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A per-thread scratch tensor of ``shape`` reused under ``name`` (contents undefined)."""
        return self._buffer(("scratch", name), prod(shape), dtype).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _buffer(self, name: tuple, count: int, dtype: torch.dtype) -> torch.Tensor:
        buffers = self._local.__dict__.setdefault("buffers", {})
        buf = buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < count:
            buf = buffers[name] = torch.empty(count, dtype=dtype)
        return buf[:count]

    def _pread(self, file: str, out: torch.Tensor, offset: int) -> None:
        with self._lock:
            if file not in self._fds:
                try:
                    self._fds[file] = os.open(file, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"{file}: cannot open ({exc.strerror})") from None
            fd = self._fds[file]
        view = memoryview(out.numpy()).cast("B")
        while view:
            try:
                n = os.preadv(fd, [view], offset)
            except OSError as exc:
                raise CheckpointError(f"{file}: read failed ({exc.strerror})") from None
            if n == 0:
                raise CheckpointError(f"{file}: file ends before byte {offset} (truncated while reading?)")
            view, offset = view[n:], offset + n


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch ops single-threaded inside: worker threads over row blocks are the parallelism, and nested
    intra-op threads would only contend for the same cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
