"""Lazy, memory-mapped access to a Hugging Face checkpoint folder.

A :class:`Checkpoint` reads only headers when opened. Tensor data is served as zero-copy views of
private (copy-on-write) memory maps of the shards, so reading a tensor costs page faults, not a copy,
and :meth:`Checkpoint.release` hands the pages back to the kernel once a caller is done with them:
peak memory then stays at a few tensors, whatever the model size.

Reads stay inside the model folder: shard names from an index must be relative paths inside it, and a
file of the folder that is a symbolic link must resolve inside it or to a Hugging Face cache blob
(``models--ORG--NAME/blobs/<hash>``; that same repo's when the folder is a cache snapshot, whose files
the hub links as ``../../blobs/<hash>``). Anything else is refused before it is opened (:func:`confined`).
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import stat
import threading
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from deltakit.errors import CheckpointError
from deltakit.io.format import DTYPES, parse_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_PAGE = mmap.PAGESIZE
_FAULT_AROUND = 2 * 1024 * 1024


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives: its shard file, absolute byte offset, dtype and shape."""

    name: str
    file: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class _Shard:
    """One safetensors file: its parsed header and, once needed, a private memory map."""

    def __init__(self, path: Path):
        self.path = path
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{path}: not a regular file")
            size = st.st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) == 8:
                    n = int.from_bytes(head, "little")
                    head += f.read(min(n, max(size - 8, 0)))
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
        entries, self.metadata, start = parse_header(head, size, str(path))
        self.metas = {
            name: TensorMeta(name, str(path), start + e["data_offsets"][0], DTYPES[e["dtype"]], tuple(e["shape"]))
            for name, e in entries.items()
        }
        self._map: mmap.mmap | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()

    def view(self, meta: TensorMeta) -> torch.Tensor:
        """A view of ``meta``'s bytes in the map, after checking that the file still holds them.

        Touching a mapped page past the end of a file cut after its header was read would kill the process
        with SIGBUS, so the size is checked again on every call; this leaves only a file cut while a caller
        is reading a view it already holds (the pread path of :class:`deltakit.io.reader.RowReader` has no
        such window).
        """
        with self._lock:
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
                size = os.fstat(self._fd).st_size
            except OSError as exc:
                raise CheckpointError(f"{self.path}: cannot read ({exc.strerror})") from None
            end = meta.offset + meta.nbytes
            if end > size:
                raise CheckpointError(f"{self.path}: file ends at byte {size}, before tensor {meta.name!r} ends at byte "
                                      f"{end} (cut after its header was read?)")
            if self._map is None:
                self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        if meta.numel == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        itemsize = torch.empty((), dtype=meta.dtype).element_size()
        if meta.offset % itemsize:
            raw = bytearray(self._map[meta.offset : meta.offset + meta.nbytes])
            return torch.frombuffer(raw, dtype=meta.dtype).reshape(meta.shape)
        return torch.frombuffer(self._map, dtype=meta.dtype, count=meta.numel, offset=meta.offset).reshape(meta.shape)

    def release(self, begin: int, end: int) -> None:
        """Drop the resident pages of ``[begin, end)`` and of the fault-around window on each side.

        A page fault maps cached neighbours too (the kernel's fault-around, and whole large folios of up
        to 2 MB where the page cache uses them), so the range is widened by 2 MB on each side, else every
        chunk would leave pages mapped. Dropping a
        page another reader still uses is harmless: the map is private and never written, so the page
        faults in again from the file.
        """
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        lo = max(begin - begin % _PAGE - _FAULT_AROUND, 0)
        hi = min(end + (-end % _PAGE) + _FAULT_AROUND, len(self._map))
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view; the map is freed with it
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Checkpoint:
    """A model folder (``config.json`` plus one or many safetensors shards) or a single safetensors file.

    Use :meth:`open`; then :meth:`keys`, :meth:`meta`, :meth:`get` (zero-copy, read-only view),
    :meth:`rows` (a row range of a large tensor) and :meth:`release` (drop its pages from memory).
    """

    def __init__(self, path: Path, config: dict, shards: dict[str, _Shard], key_to_file: dict[str, str]):
        self.path = path
        self.config = config
        self._shards = shards
        self._key_to_file = key_to_file
        self._pickled: dict[str, torch.Tensor] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, allow_pickle: bool = False) -> "Checkpoint":
        """Open a checkpoint, reading headers only. Raises :class:`CheckpointError` with one clear line.

        A folder is read only inside itself (see :func:`confined`): an index naming a shard outside the
        folder, or a file of the folder linked outside it (other than to a Hugging Face cache blob), is
        refused before anything outside is opened. Pickled ``.bin`` weights only with ``allow_pickle``, and
        then through ``torch.load(weights_only=True)``.
        """
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise CheckpointError(f"{path}: not a model folder or a .safetensors file")
            shard = _Shard(path)
            return cls(path, {}, {path.name: shard}, {k: path.name for k in shard.metas})
        roots = _roots(path)
        for entry in sorted(path.iterdir()):
            if entry.is_symlink() and entry.is_file():  # a link to a folder is never read; a broken one cannot be
                confined(entry, roots)
        config = _read_json(path / "config.json") if (path / "config.json").exists() else {}
        index = path / INDEX_NAME
        if index.exists():
            weight_map = _weight_map(index)
            files = sorted(set(weight_map.values()))
            for f in files:
                confined(_member(path, f, index), roots)
            missing = [f for f in files if not _exists(path / f)]
            if missing:
                raise CheckpointError(f"{path}: shard {missing[0]!r} named in {INDEX_NAME} is missing ({len(missing)} of {len(files)} shards)")
            shards = {f: _Shard(path / f) for f in files}
            for key, f in weight_map.items():
                if key not in shards[f].metas:
                    raise CheckpointError(f"{path / f}: index says it holds {key!r}, but the shard does not")
            return cls(path, config, shards, dict(weight_map))
        singles = sorted(p.name for p in path.glob("*.safetensors"))
        if singles:
            _check_shard_series(path, singles)
            for f in singles:
                confined(path / f, roots)
            shards = {f: _Shard(path / f) for f in singles}
            key_to_file = {k: f for f, s in shards.items() for k in s.metas}
            return cls(path, config, shards, key_to_file)
        pickles = [n for n in _PICKLE_NAMES if (path / n).exists()]
        if pickles:
            if not allow_pickle:
                raise CheckpointError(
                    f"{path}: only pickled .bin weights found; refusing to unpickle them (pass --allow-pickle to load with weights_only=True)"
                )
            return cls._open_pickled(path, config, roots)
        if not config:
            raise CheckpointError(f"{path}: not a model folder (no config.json and no weights)")
        raise CheckpointError(f"{path}: no weights found (no {SINGLE_NAME} or {INDEX_NAME})")

    @classmethod
    def _open_pickled(cls, path: Path, config: dict, roots: Roots) -> "Checkpoint":
        """Only with ``--allow-pickle``: each ``.bin`` through ``torch.load(weights_only=True)`` (no arbitrary objects)."""
        index = path / "pytorch_model.bin.index.json"
        weight_map = _weight_map(index) if index.exists() else {"": "pytorch_model.bin"}
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(set(weight_map.values())):
            confined(_member(path, f, index), roots)
            if not _exists(path / f):
                raise CheckpointError(f"{path}: shard {f} is missing")
            loaded = _load_pickle(path / f)
            if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
                raise CheckpointError(f"{path / f}: not a state dict (expected a mapping of names to tensors)")
            tensors.update(loaded)
        ckpt = cls(path, config, {}, {k: "pickle" for k in tensors})
        ckpt._pickled = tensors
        return ckpt

    # -- queries -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def __len__(self) -> int:
        return len(self._key_to_file)

    def meta(self, key: str) -> TensorMeta:
        """Dtype, shape and location of ``key`` without reading data."""
        if self._pickled is not None:
            t = self._pickled[key]
            return TensorMeta(key, "pickle", 0, t.dtype, tuple(t.shape))
        return self._shards[self._file(key)].metas[key]

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of all shards, merged."""
        out: dict[str, str] = {}
        for s in self._shards.values():
            out.update(s.metadata)
        return out

    def get(self, key: str) -> torch.Tensor:
        """A read-only, zero-copy view of tensor ``key`` (clone it before writing into it)."""
        if self._pickled is not None:
            return self._pickled[key]
        shard = self._shards[self._file(key)]
        return shard.view(shard.metas[key])

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``key`` (along dim 0) as a zero-copy view."""
        return self.get(key)[start:stop]

    def release(self, key: str, row_start: int | None = None, row_stop: int | None = None) -> None:
        """Hand the resident pages of ``key`` (or of a row range of it) back to the kernel."""
        if self._pickled is not None:
            return
        meta = self.meta(key)
        begin, end = meta.offset, meta.offset + meta.nbytes
        if row_start is not None and meta.shape:
            row_bytes = meta.nbytes // max(meta.shape[0], 1)
            begin, end = meta.offset + row_start * row_bytes, meta.offset + (row_stop or meta.shape[0]) * row_bytes
        self._shards[self._file(key)].release(begin, end)

    def files(self) -> list[Path]:
        """The weight files of this checkpoint."""
        return [s.path for s in self._shards.values()]

    def non_weight_files(self) -> list[Path]:
        """Files of the folder that are neither weights nor weight indexes (config, tokenizer, processor ...)."""
        if self.path.is_file():
            return []
        skip = {INDEX_NAME, *_PICKLE_NAMES}
        roots = _roots(self.path)
        files = sorted(
            p for p in self.path.iterdir()
            if p.is_file() and p.suffix not in (".safetensors", ".bin", ".pt", ".pth") and p.name not in skip
        )
        for p in files:  # checked at open too; a link swapped in since is refused before a caller copies it
            if p.is_symlink():
                confined(p, roots)
        return files

    def close(self) -> None:
        """Unmap all shards (views handed out stay valid until garbage-collected)."""
        for s in self._shards.values():
            s.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _file(self, key: str) -> str:
        try:
            return self._key_to_file[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in checkpoint {self.path}") from None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors, {len(self._shards)} files)"


@dataclass(frozen=True)
class Roots:
    """Where the files of a model folder may resolve to (see :func:`confined`)."""

    folder: Path
    repo: Path | None  # the models--ORG--NAME folder when ``folder`` is a snapshot of the Hugging Face cache


def _load_pickle(file: Path) -> object:
    """``torch.load(file, weights_only=True)``: tensors and plain containers only, never arbitrary objects.

    Memory-mapped when the file is in the zip format of torch >= 1.6; the legacy format is read whole.
    """
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith(boiler)]
        why = lines[0].rstrip(".") if lines else "not a plain tensor pickle"
        raise CheckpointError(f"{file}: refused by torch.load(weights_only=True) ({why}); "
                              "deltakit never unpickles arbitrary objects") from None
    except Exception as exc:  # torch raises many types for a bad pickle
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise CheckpointError(f"{file}: cannot load with weights_only=True ({exc.__class__.__name__}"
                              + (f": {first}" if first else "") + ")") from None


def _roots(folder: Path) -> Roots:
    """The :class:`Roots` of ``folder``: the folder itself with links resolved, and the cache repo it is a
    snapshot of (``.../models--ORG--NAME/snapshots/REV[/SUB]``), if any."""
    real = Path(os.path.realpath(folder))
    for up in real.parents:
        if up.name == "snapshots" and up.parent.name.startswith("models--"):
            return Roots(real, up.parent)
    return Roots(real, None)


def _is_blob(real: Path, repo: Path | None) -> bool:
    """Whether ``real`` is a Hugging Face cache blob (``models--*/blobs/<hash>``), of ``repo`` when given."""
    if real.parent.name != "blobs" or not real.parent.parent.name.startswith("models--"):
        return False
    return repo is None or real.parent.parent == repo


def confined(path: Path, roots: Roots) -> Path:
    """``path`` with links resolved; a :class:`CheckpointError`, before anything is opened, if it leaves the folder.

    The rule for a model folder's files (its shards, index, config and the files ``merge`` and ``finetune``
    copy): they may be symbolic links only to files inside the folder, or to Hugging Face cache blobs
    (``models--ORG--NAME/blobs/<hash>``). When the folder is itself a cache snapshot
    (``models--ORG--NAME/snapshots/REV``, whose files the hub links as ``../../blobs/<hash>``), only to
    blobs of that same repo. So cached models, and ``--local-dir`` downloads whose large files
    huggingface_hub < 0.23 linked to cache blobs (``local_dir_use_symlinks="auto"``), keep working, and a link
    to ``/etc/passwd``, a key or another model's folder is refused.
    """
    real = Path(os.path.realpath(path))
    if real.is_relative_to(roots.folder) or _is_blob(real, roots.repo):
        return real
    rule = ("that repo's models--*/blobs" if roots.repo is not None else "a Hugging Face cache's models--*/blobs")
    raise CheckpointError(f"{path}: links to {real}, outside the model folder; refusing to read it "
                          f"(deltakit reads a model folder's files only inside it or in {rule})")


def _encodable(name: str) -> bool:
    """Whether ``name`` can be a path on this system (a lone surrogate such as JSON's ``\\ud800`` cannot)."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return True


def _member(folder: Path, name: str, index: Path) -> Path:
    """``folder / name`` for a file name taken from ``index``: a relative path that stays inside ``folder``."""
    if not name.strip() or not name.isprintable() or not _encodable(name):  # NUL, newline, lone surrogates
        raise CheckpointError(f"{index}: shard name {name!r} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{index}: names shard {name!r} outside the model folder; refusing to read it "
                              "(shard names must be relative paths inside the folder)")
    return folder / rel


def _exists(path: Path) -> bool:
    """``path.exists()``, with a name the file system cannot take (too long ...) as one :class:`CheckpointError` line."""
    try:
        return path.exists()
    except OSError as exc:
        raise CheckpointError(f"{str(path)[:200]}: cannot read ({exc.strerror})") from None


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file: a non-empty mapping of tensor names to shard file names."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{index}: weight_map gives {bad!r} the shard {weight_map[bad]!r}, not a file name")
    return weight_map


_SERIES = re.compile(r"(.+)-(\d+)-of-(\d+)\.safetensors$")


def _check_shard_series(folder: Path, names: list[str]) -> None:
    """Without an index, shards named ``X-0000i-of-0000n.safetensors`` must all be present."""
    for name in names:
        m = _SERIES.match(name)
        if m:
            stem, width, n = m.group(1), len(m.group(2)), int(m.group(3))
            want = [f"{stem}-{i:0{width}d}-of-{m.group(3)}.safetensors" for i in range(1, n + 1)]
            missing = [w for w in want if w not in names]
            if missing:
                raise CheckpointError(f"{folder}: shard {missing[0]} is missing ({len(missing)} of {n} shards, and no {INDEX_NAME})")


def _read_json(path: Path) -> dict:
    """A JSON object from a small file of a model folder (config, index); one :class:`CheckpointError` line otherwise."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: invalid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: invalid JSON (nested too deeply)") from None
    except ValueError:  # int() of a number past Python's 4300-digit limit
        raise CheckpointError(f"{path}: invalid JSON (a number with too many digits)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
