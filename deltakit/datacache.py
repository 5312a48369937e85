"""Training data processed once: an on-disk, memory-mapped cache of :class:`~deltakit.data.SFTDataset` items.

``cached_dataset(data, processor, ...)`` runs the processor (chat template, tokenizer, image processor,
label masks, cutoff policy) once per example and writes every tensor into safetensors shards under
``<cache root>/sft/<key>/``; every epoch, every process of a distributed run and every later run with the
same key reads them back through a memory map, as exactly the tensors the processor made (dtype
included). The key is a SHA-256 over what the tensors depend on (:func:`cache_key`): the data file's
bytes, each image file's path, size and modification time, the processor as saved by ``save_pretrained``
(tokenizer, image processor, chat template), the template arguments, the cutoff and its policy, the
transformers version and :data:`FORMAT_VERSION`. Change any of them and a new entry is built; nothing is
ever updated in place.

Layout of an entry: ``index.json`` (key parts, shard list, per-key dtypes, cutoff counts) and
``shard-NNNNN.safetensors`` files, each holding for its examples ``lengths`` and ``source`` (the
example's index in the JSONL) and, per tensor name ``K`` of the items, ``K.data`` (every example's tensor
flattened and concatenated; integers stored as int32 when they fit), ``K.offsets`` (``[n + 1]`` element
offsets) and ``K.shapes`` (``[n, ndim]``, ``-1`` rows where an example has no such tensor). The files are
plain safetensors (``safetensors.safe_open`` reads them).

Concurrency: the builder holds an exclusive ``flock`` on ``<key>.lock``; other processes (the other ranks
of a ``torchrun`` launch, or a second run) block on it and then open what it wrote. The entry is written
into a temporary folder renamed into place when complete (:func:`deltakit.io.writer.atomic_output_dir`),
so a killed build leaves no entry, only a temporary folder that the next build removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakit.data import Encoded, Example, SFTDataset
from deltakit.errors import DeltakitError
from deltakit.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the entry layout or the meaning of a stored tensor changes."""
CACHE_ENV = "DELTAKIT_CACHE_DIR"
SHARD_BYTES = 256 * 1024**2
STATUSES = ("kept", "truncated", "dropped_long", "dropped_prompt", "dropped_image")


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """Where entries live: ``override``, else ``$DELTAKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/deltakit``, else
    ``~/.cache/deltakit``."""
    if override:
        return Path(override)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deltakit"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def processor_digest(processor: Any) -> str:
    """SHA-256 of the files ``processor.save_pretrained`` writes (tokenizer, image processor, chat template)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(tmp)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(data: str | os.PathLike, examples: Sequence[Example], processor: Any, max_length: int | None,
              cutoff_policy: str, template_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The entry name (hex SHA-256) and the parts it is computed from (stored in ``index.json``)."""
    import transformers

    images = sorted({str(p.resolve()) for ex in examples for p in ex.images})
    h = hashlib.sha256()
    for name in images:
        st = os.stat(name)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    parts = {
        "format": FORMAT_VERSION,
        "data": str(Path(data).resolve()),
        "data_sha256": _sha256_file(Path(data)),
        "images": len(images),
        "images_stat_sha256": h.hexdigest(),
        "processor_sha256": processor_digest(processor),
        "processor_class": type(processor).__name__,
        "template_kwargs": dict(sorted(template_kwargs.items())),
        "cutoff_len": max_length,
        "cutoff_policy": cutoff_policy if max_length is not None else None,
        "transformers": transformers.__version__,
    }
    key = hashlib.sha256(json.dumps({k: v for k, v in parts.items() if k != "data"}, sort_keys=True).encode()).hexdigest()
    return key[:32], parts


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created), held for the block; waits while another process holds it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DeltakitError(f"{path.parent}: cannot use this data cache folder ({exc.strerror}); "
                            f"choose another with --cache-dir or ${CACHE_ENV}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class _Encoder(torch.utils.data.Dataset):
    """The examples of an :class:`SFTDataset` as :class:`Encoded` records, for a DataLoader's workers (a bad record's
    error is returned, to be raised as one line in the building process, not wrapped in a worker traceback)."""

    def __init__(self, dataset: SFTDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Encoded | DeltakitError]:
        try:
            return index, self.dataset.encode(index)
        except DeltakitError as exc:
            return index, exc


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def _as_is(record: Any) -> Any:
    return record


def _storage_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """int32 for int64 tensors whose values all fit (token ids, grids), else the tensors' own dtype."""
    dtype = tensors[0].dtype if tensors else torch.int32
    if dtype == torch.int64 and all(t.numel() == 0 or (int(t.min()) >= -2**31 and int(t.max()) < 2**31) for t in tensors):
        return torch.int32
    return dtype


class _ShardBuilder:
    """Collects encoded items and writes them as ``shard-NNNNN.safetensors`` files of about :data:`SHARD_BYTES`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shards: list[dict[str, Any]] = []
        self.keys: dict[str, dict[str, Any]] = {}
        self._items: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._bytes = 0

    def add(self, source: int, item: dict[str, torch.Tensor]) -> None:
        for name, t in item.items():
            seen = self.keys.setdefault(name, {"dtype": str(t.dtype).removeprefix("torch."), "ndim": t.dim()})
            if seen["dtype"] != str(t.dtype).removeprefix("torch.") or seen["ndim"] != t.dim():
                raise DeltakitError(f"{name}: the processor returned {t.dtype} [{t.dim()}-D] for example {source}, "
                                    f"but {seen['dtype']} [{seen['ndim']}-D] before")
        self._items.append((source, item))
        self._bytes += sum(t.numel() * t.element_size() for t in item.values())
        if self._bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the collected examples as the next shard; each tensor goes to its place in the file, uncopied."""
        from deltakit.io.writer import SafetensorsWriter, TensorSpec

        if not self._items:
            return
        n = len(self._items)
        small: dict[str, torch.Tensor] = {
            "lengths": torch.tensor([len(it["input_ids"]) for _, it in self._items], dtype=torch.int64),
            "source": torch.tensor([s for s, _ in self._items], dtype=torch.int64)}
        parts: dict[str, tuple[torch.dtype, list[torch.Tensor | None]]] = {}
        for name, info in self.keys.items():
            having = [it.get(name) for _, it in self._items]
            dtype = _storage_dtype([t for t in having if t is not None])
            sizes = torch.tensor([0 if t is None else t.numel() for t in having])
            small[f"{name}.offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
            small[f"{name}.shapes"] = torch.tensor([list(t.shape) if t is not None else [-1] * info["ndim"] for t in having],
                                                   dtype=torch.int64).reshape(n, info["ndim"])
            parts[name] = (dtype, having)
        file = self.folder / f"shard-{len(self.shards):05d}.safetensors"
        specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in small.items()]
        specs += [TensorSpec(f"{k}.data", dtype, (int(small[f"{k}.offsets"][-1]),)) for k, (dtype, _) in parts.items()]
        with SafetensorsWriter(file, specs, {"format": "deltakit-sft-cache", "version": str(FORMAT_VERSION)}) as writer:
            for k, t in small.items():
                writer.write(k, t.contiguous())
            for k, (dtype, having) in parts.items():
                for j, t in enumerate(having):
                    if t is not None and t.numel():
                        writer.write_rows(f"{k}.data", int(small[f"{k}.offsets"][j]), t.reshape(-1).to(dtype))
        self.shards.append({"file": file.name, "examples": n})
        self._items, self._bytes = [], 0


@dataclass
class CacheStats:
    """What the cutoff policy did: examples per status, tokens and trained tokens cut (truncated and dropped
    examples), and the first few dropped examples' reasons."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    tokens_cut: int = 0
    targets_cut: int = 0
    dropped: list[str] = field(default_factory=list)

    def add(self, enc: Encoded) -> None:
        self.counts[enc.status] += 1
        self.tokens_cut += enc.tokens_cut
        self.targets_cut += enc.targets_cut
        if enc.item is None and len(self.dropped) < 20:
            self.dropped.append(enc.reason)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "tokens_cut": self.tokens_cut, "targets_cut": self.targets_cut, "dropped": self.dropped}


def build_entry(folder: Path, dataset: SFTDataset, parts: dict[str, Any], workers: int = 0,
                progress: ProgressFn = no_progress) -> None:
    """Encode every example of ``dataset`` (``workers`` DataLoader processes, in order) into ``folder``."""
    stats = CacheStats()
    builder = _ShardBuilder(folder)
    loader = torch.utils.data.DataLoader(_Encoder(dataset), batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=_as_is, worker_init_fn=_one_thread if workers else None)
    progress(0, total=len(dataset), description="preparing data")
    for index, enc in loader:
        if isinstance(enc, DeltakitError):
            raise enc
        stats.add(enc)
        if enc.item is not None:
            builder.add(index, enc.item)
        progress(1)
    builder.flush()
    if not builder.shards:
        raise DeltakitError(f"{parts['data']}: every one of {len(dataset)} examples was dropped by the cutoff "
                            f"({parts['cutoff_len']} tokens), e.g. {stats.dropped[0] if stats.dropped else ''}")
    index = {"format": FORMAT_VERSION, "key": parts, "examples": sum(s["examples"] for s in builder.shards),
             "shards": builder.shards, "keys": builder.keys, "stats": stats.to_dict()}
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")


class CachedDataset(Sequence):
    """The items of a cache entry (:func:`cached_dataset`), read through memory maps.

    ``dataset[i]`` is the dict of tensors :class:`~deltakit.data.SFTDataset` gave for the ``i``-th kept
    example (``source[i]`` is its index in the data file); ``lengths`` are their token counts, ``stats`` the
    cutoff counts of the build. Per-image tensors are read-only views of the map (a private one: writing to
    them never reaches the file); integer tensors are copies in their original dtype. Picklable, so
    DataLoader workers open their own maps.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        if index.get("format") != FORMAT_VERSION:
            raise DeltakitError(f"{self.folder}: cache format {index.get('format')}, this deltakit reads {FORMAT_VERSION}")
        self.index = index
        self.stats: dict[str, Any] = index["stats"]
        self._dtypes = {k: getattr(torch, v["dtype"]) for k, v in index["keys"].items()}
        self._where: list[tuple[int, int]] = [(s, j) for s, shard in enumerate(index["shards"]) for j in range(shard["examples"])]
        self._shards: list[dict[str, torch.Tensor]] | None = None
        self._files: list[Any] = []
        self._pid = -1
        self.lengths: list[int] = [int(x) for sh in self._views() for x in sh["lengths"]]
        self.source: list[int] = [int(x) for sh in self._views() for x in sh["source"]]

    def _views(self) -> list[dict[str, torch.Tensor]]:
        """Each shard's tensors as views of its memory map (mapped again in a forked worker)."""
        from deltakit.io.checkpoint import Checkpoint

        if self._shards is None or self._pid != os.getpid():
            self._files = [Checkpoint.open(self.folder / shard["file"]) for shard in self.index["shards"]]
            self._shards = [{k: f.get(k) for k in f.keys()} for f in self._files]
            self._pid = os.getpid()
        return self._shards

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s, j = self._where[index]
        shard = self._views()[s]
        item = {}
        for name, dtype in self._dtypes.items():
            shape = shard[f"{name}.shapes"][j].tolist()
            if shape and shape[0] < 0:
                continue
            lo, hi = int(shard[f"{name}.offsets"][j]), int(shard[f"{name}.offsets"][j + 1])
            flat = shard[f"{name}.data"][lo:hi]
            item[name] = (flat if flat.dtype == dtype else flat.to(dtype)).reshape(shape)
        return item

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": None, "_files": [], "_pid": -1}


def cached_dataset(data: str | os.PathLike, processor: Any, *, examples: Sequence[Example] | None = None,
                   max_length: int | None = None, cutoff_policy: str = "truncate",
                   template_kwargs: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                   workers: int = 0, progress: ProgressFn = no_progress) -> CachedDataset:
    """The processed examples of the training JSONL ``data``: opened from the cache, or built into it first.

    ``examples`` (default ``load_examples(data)``) must be that file's records. One process builds an
    entry while the others wait on its lock (see the module docstring); ``workers`` DataLoader processes run
    the processor in parallel during a build.
    """
    from deltakit.data import load_examples
    from deltakit.io.writer import atomic_output_dir

    template_kwargs = dict(template_kwargs or {})
    examples = load_examples(data) if examples is None else examples
    key, parts = cache_key(data, examples, processor, max_length, cutoff_policy, template_kwargs)
    folder = cache_root(cache_dir) / "sft" / key
    with _locked(folder.with_name(key + ".lock")):
        if not (folder / "index.json").is_file():
            log.info("processing %d examples of %s into the data cache %s", len(examples), data, folder)
            dataset = SFTDataset(examples, processor, max_length, cutoff_policy, template_kwargs)
            with atomic_output_dir(folder, overwrite=folder.exists()) as tmp:
                build_entry(tmp, dataset, parts, workers, progress)
        else:
            log.info("data cache hit: %s", folder)
        return CachedDataset(folder)


def build_workers() -> int:
    """Processes that run the processor while an entry is built: one per CPU core this process may use but one (the
    building process writes the shards; the other ranks wait for it), at most 8; none on 1 or 2 cores, where moving
    each example's pixels between processes costs more than the second core gains (docs/benchmarks.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores - 1) if cores > 2 else 0


@dataclass
class CacheRequest:
    """Everything :func:`cached_dataset` needs, to be opened later (by the training loop, with its progress bar);
    ``workers`` None = :func:`build_workers`."""

    data: str | os.PathLike
    processor: Any
    max_length: int | None = None
    cutoff_policy: str = "truncate"
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | os.PathLike | None = None
    workers: int | None = None

    def open(self, progress: ProgressFn = no_progress) -> CachedDataset:
        return cached_dataset(self.data, self.processor, max_length=self.max_length, cutoff_policy=self.cutoff_policy,
                              template_kwargs=self.template_kwargs, cache_dir=self.cache_dir,
                              workers=build_workers() if self.workers is None else self.workers, progress=progress)
