"""Atomic safetensors writing.

The layout of every output file is fixed before the first byte of data, so tensors can be written in
any order, whole or a row range at a time, from several threads (``os.pwrite`` at known offsets), and
nothing ever has to be held in memory to build a shard. Outputs appear under their final name only
when complete: files are renamed at :meth:`SafetensorsWriter.close`, folders by
:func:`atomic_output_dir`, small files by :func:`write_file_atomic`. A failed write (disk full ...) raises
:class:`~deltakit.errors.OutputError` naming the output and leaves no temporary file or folder behind.

A process killed outright (SIGKILL, power loss, OOM killer) cannot clean up: its temporary
``.NAME.xxxxxxxx.tmp`` stays beside the output, but the final name never appears. Each writer holds an
advisory lock (``flock``) on its temporary file or folder while it lives, so the next run that writes the
same output recognises one without a live owner as stale, removes it and logs a line saying so
(:func:`remove_stale`); the temporary output of a run still going is left alone.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import struct
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from deltakit.errors import OutputError, OutputExistsError
from deltakit.io.format import build_header, element_size

DEFAULT_SHARD_BYTES = 2 * 1024**3
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor to be written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * element_size(self.dtype)


_REASONS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_START, _WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER
WRITE_THROUGH_BYTES = 1 << 16
WRITE_BEHIND_BYTES = 64 << 20


def _sync_range(fd: int, offset: int, size: int, flags: int) -> None:
    if _LIBC.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(size), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class WriteBehind:
    """Send written ranges of one file to the disk as they come, and drop them from the page cache once written (Linux).

    Written outputs would otherwise fill the page cache with dirty pages, evicting the inputs being
    streamed and leaving the kernel to write everything back under memory pressure. Each range is
    handed to the disk at once (``sync_file_range(WRITE)``, no waiting); once more than
    :data:`WRITE_BEHIND_BYTES` are in flight, the oldest ranges are waited for (by then mostly on disk)
    and dropped (``posix_fadvise(DONTNEED)``). Small writes (headers) are left to the final ``fsync``.
    A no-op elsewhere. Measured in docs/benchmarks.md#scale.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self._lock = threading.Lock()
        self._inflight: collections.deque[tuple[int, int]] = collections.deque()
        self._bytes = 0

    def written(self, offset: int, size: int) -> None:
        """``size`` bytes were just written at ``offset``."""
        if _LIBC is None or size < WRITE_THROUGH_BYTES:
            return
        _sync_range(self.fd, offset, size, _START)
        done = []
        with self._lock:
            self._inflight.append((offset, size))
            self._bytes += size
            while self._bytes > WRITE_BEHIND_BYTES:
                done.append(self._inflight.popleft())
                self._bytes -= done[-1][1]
        for o, n in done:
            _sync_range(self.fd, o, n, _WAIT)
            os.posix_fadvise(self.fd, o, n, os.POSIX_FADV_DONTNEED)

    def drop_all(self) -> None:
        """After the final ``fsync``: drop what is still cached."""
        if _LIBC is not None:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _write_error(path: Path, exc: OSError) -> OutputError:
    """The :class:`OutputError` for a failed write to the output ``path``."""
    return OutputError(path, _REASONS.get(exc.errno, f"write failed ({exc.strerror})"))


def _tmp_name(path: Path) -> Path:
    """A unique hidden name beside ``path`` for its temporary version."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _lock(fd: int) -> bool:
    """Take the advisory lock that marks a temporary output as owned by a live process; False if another holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _lock_path(path: Path) -> int:
    """Open ``path`` (a file or folder) and lock it; returns the descriptor (close it to release the lock)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    _lock(fd)
    return fd


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary versions of output ``path`` that interrupted runs left beside it; returns them.

    A candidate is named like :func:`_tmp_name` makes them (``.NAME.xxxxxxxx.tmp``, or ``.NAME.xxxxxxxx.old`` for
    an output being replaced under ``--force``). It is stale when nobody holds its lock: a writer keeps it
    locked while alive, and the kernel drops the lock of a killed process. One still locked belongs to a
    run in progress and is left alone. Each removal is logged (a warning: an earlier run did not finish).
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.(tmp|old)")
    try:
        candidates = sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:  # no parent folder yet, or not readable: nothing to clean
        return []
    removed = []
    for stale in candidates:
        try:
            mode = os.lstat(stale).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                continue  # a link or a device under our naming scheme was not made by us
            fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if stat.S_ISDIR(mode) else 0))
        except OSError:  # renamed or removed meanwhile
            continue
        try:
            if not _lock(fd):
                log.info("%s: left alone, another run is writing %s", stale, path)
                continue
            if stat.S_ISDIR(mode):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        finally:
            os.close(fd)
        if os.path.lexists(stale):
            log.warning("%s: could not remove this temporary output of an interrupted run", stale)
        else:
            log.warning("removed %s: the unfinished temporary output of an interrupted run", stale)
            removed.append(stale)
    return removed


class SafetensorsWriter:
    """Write one safetensors file with a fixed layout; the file appears under ``path`` on :meth:`close`.

    A failed write raises :class:`OutputError` and unlinks the temporary file at once (other threads may
    still be writing to it); :meth:`abort`, which the ``with`` block calls on any error, releases it.
    """

    def __init__(self, path: str | os.PathLike, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise ValueError("duplicate tensor names in one safetensors file")
        header, self._offsets = build_header([(s.name, s.dtype, s.shape) for s in specs], metadata)
        self._header_len = len(header)
        self._tmp = _tmp_name(self.path)
        self._written = {s.name: 0 for s in specs}
        self._lock = threading.Lock()
        remove_stale(self.path)
        try:
            self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise _write_error(self.path, exc) from None
        _lock(self._fd)  # held until the file is renamed into place: marks it as not stale (remove_stale)
        self._behind = WriteBehind(self._fd)
        try:
            os.ftruncate(self._fd, len(header) + sum(s.nbytes for s in specs))
            self._pwrite(memoryview(header), 0)
        except BaseException as exc:  # a signal's exception too: the caller never gets the writer to abort
            self.abort()
            if isinstance(exc, OSError):
                raise _write_error(self.path, exc) from None
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor ``name``."""
        spec = self.specs[name]
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != planned {spec.shape}")
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` as rows ``[row_start, row_start + len(rows))`` of tensor ``name``."""
        spec = self.specs[name]
        if rows.dtype != spec.dtype:
            raise ValueError(f"{name}: dtype {rows.dtype} != planned {spec.dtype}")
        if spec.shape and tuple(rows.shape[1:]) != spec.shape[1:]:
            raise ValueError(f"{name}: row shape {tuple(rows.shape[1:])} != planned {spec.shape[1:]}")
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else spec.nbytes
        data = rows.detach().to("cpu").contiguous().reshape(-1)
        buf = memoryview(data.view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
        self._pwrite(buf, self._offsets[name] + row_start * row_bytes)
        with self._lock:
            self._written[name] += len(buf)

    def rewrite_metadata(self, metadata: dict[str, str]) -> None:
        """Replace the header's ``__metadata__`` before :meth:`close` (e.g. with statistics known only at the end).

        The new header must not be longer than the one laid out at construction (plan it with placeholder
        values at least as long as the final ones); it is padded with spaces so no tensor moves.
        """
        header, _ = build_header([(s.name, s.dtype, s.shape) for s in self.specs.values()], metadata)
        body = header[8:].rstrip(b" ")
        room = self._header_len - 8
        if len(body) > room:
            raise ValueError(f"{self.path}: new metadata needs {len(body)} header bytes, only {room} were planned")
        body += b" " * (room - len(body))
        self._pwrite(memoryview(struct.pack("<Q", room) + body), 0)

    def close(self) -> Path:
        """Check that every tensor was fully written, flush, and move the file to its final name."""
        short = [n for n, s in self.specs.items() if self._written[n] != s.nbytes]
        if short:
            self.abort()
            raise RuntimeError(f"{self.path}: {len(short)} tensors incompletely written, e.g. {short[0]!r}")
        try:
            os.fsync(self._fd)
            self._behind.drop_all()
            os.replace(self._tmp, self.path)  # still locked: never seen as stale on the way
            fd, self._fd = self._fd, -1
            os.close(fd)
        except OSError as exc:
            self.abort()
            raise _write_error(self.path, exc) from None
        return self.path

    def abort(self) -> None:
        """Discard the partial file."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        self._tmp.unlink(missing_ok=True)

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        """Write all of ``buf`` at ``offset`` and hand it to the disk (:class:`WriteBehind`); on failure unlink the
        temporary file and raise :class:`OutputError`."""
        buf = buf.cast("B")
        start, size = offset, len(buf)
        try:
            while buf:
                n = os.pwrite(self._fd, buf, offset)
                buf, offset = buf[n:], offset + n
            self._behind.written(start, size)
        except OSError as exc:
            self._tmp.unlink(missing_ok=True)
            raise _write_error(self.path, exc) from None

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardedWriter:
    """Write a Hugging Face-style sharded checkpoint (``model-0000i-of-0000n.safetensors`` + index) into ``folder``.

    Tensors are assigned to shards in the given order, a new shard starting when ``max_shard_bytes``
    would be exceeded. Use inside :func:`atomic_output_dir` so the folder appears only when complete.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        specs: Sequence[TensorSpec],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if groups[-1] and size + s.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += s.nbytes
        n = len(groups)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        meta = {"format": "pt", **(metadata or {})}
        self._writers: list[SafetensorsWriter] = []
        try:
            for name, group in zip(names, groups):
                self._writers.append(SafetensorsWriter(self.folder / name, group, meta))
        except BaseException:
            self.abort()
            raise
        self._by_name = {s.name: w for w in self._writers for s in w.specs.values()}
        self.total_size = sum(s.nbytes for s in specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor ``name``."""
        self._by_name[name].write(name, tensor)

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        """Write a row range of tensor ``name``."""
        self._by_name[name].write_rows(name, row_start, rows)

    def close(self) -> Path:
        """Finish every shard and write ``model.safetensors.index.json``; returns the index path.

        On any error every shard is discarded.
        """
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {name: w.path.name for name, w in self._by_name.items()},
        }
        path = self.folder / "model.safetensors.index.json"
        try:
            for w in self._writers:
                w.close()
            write_file_atomic(path, (json.dumps(index, indent=2) + "\n").encode())
        except BaseException:
            self.abort()
            raise
        return path

    def abort(self) -> None:
        """Discard every partial shard."""
        for w in self._writers:
            w.abort()

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def check_output_free(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise :class:`OutputExistsError` if ``out`` exists and ``overwrite`` is false; return it as a Path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists (use --force to replace it)")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it is removed.

    A reader never sees a half-written ``out``: it either does not exist, is the old one, or is complete.
    Temporary folders of earlier runs that were killed are removed first, with a log line (:func:`remove_stale`).
    A full disk inside the block (a shard, or any other file written there) becomes one
    :class:`OutputError` naming ``out``.
    """
    out = check_output_free(out, overwrite).absolute()
    remove_stale(out)
    tmp = _tmp_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise _write_error(out, exc) from None
    try:
        lock = _lock_path(tmp)  # held until the end: a live run's folder is never taken for a stale one
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out, exc) from None
    try:
        yield tmp
        _replace_dir(tmp, out)
    except OutputError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        part = exc.path.relative_to(tmp) if exc.path.is_relative_to(tmp) else exc.path
        raise OutputError(out, f"{exc.reason} (writing {part})") from None
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in _REASONS:
            raise
        raise _write_error(out, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the folder ``tmp`` to ``out``, replacing an existing ``out`` (put back if the move fails)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    trash = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    lock = _lock_path(out)  # the old output, while it waits under its trash name
    try:
        os.replace(out, trash)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(trash, out)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        os.close(lock)


def write_file_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it that replaces ``path`` when complete.

    A symbolic link stays and its target is replaced; a pipe or device (``/dev/stdout``) is written
    directly. Raises :class:`OutputError` (disk full ...) with nothing left under either name.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise _write_error(path, exc) from None
        return path
    target = Path(os.path.realpath(path))
    tmp = _tmp_name(target)
    remove_stale(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        try:
            _lock(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.replace(tmp, target)
        finally:
            os.close(fd)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
    return path
