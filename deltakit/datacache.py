"""Training data processed once: an on-disk, memory-mapped cache of :class:`~deltakit.data.SFTDataset` items.

``cached_dataset(data, processor, ...)`` runs the processor (chat template, tokenizer, image processor,
label masks, cutoff policy) once per example and writes every tensor into safetensors shards under
``<cache root>/sft/<key>/``; every epoch, every process of a distributed run and every later run with the
same key reads them back through a memory map, as exactly the tensors the processor made (dtype
included). The key is a SHA-256 over what the tensors depend on (:func:`cache_key`): the data file's
bytes, each image file's path, size and modification time, the processor as saved by ``save_pretrained``
(tokenizer, image processor, chat template), the template arguments, the cutoff and its policy, the
transformers version, the pixel storage and :data:`FORMAT_VERSION`. Change any of them and a new entry is
built; nothing is ever updated in place.

Pixel storage (``--cache-pixels``, :func:`pixel_storage`): the image processor makes float32 pixel values,
about 18 MiB per example for Qwen2.5-VL images of 448-1344 px. ``float32`` stores them as made;
``bfloat16`` rounds them to bf16 (half the bytes): exactly what the model sees when it trains in bf16 and its
forward rounds the pixels to bf16 before any arithmetic (:data:`BF16_EXACT`); ``none`` stores no pixels:
each item's images are read and run through the processor's image processor again when it is read (in the
DataLoader workers), and the grids it gives are checked against the stored ones. ``auto`` is ``bfloat16``
for a bf16 run of a :data:`BF16_EXACT` model, else ``float32``.

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
from deltakit.train.config import CACHE_PIXELS as PIXEL_POLICIES

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bumped whenever the entry layout or the meaning of a stored tensor changes."""
CACHE_ENV = "DELTAKIT_CACHE_DIR"
SHARD_BYTES = 256 * 1024**2
STATUSES = ("kept", "truncated", "dropped_long", "dropped_prompt", "dropped_image")
PIXELS = "pixel_values"
BF16_EXACT = ("qwen2_vl", "qwen2_5_vl")
"""Model types whose forward rounds float32 pixel values to bf16 before any arithmetic in a bf16 run: transformers'
``get_image_features`` casts them to the vision tower's dtype (bf16 under FSDP mixed precision) and their only
consumer, the patch embedding's ``Conv3d``, runs in bf16 under autocast; so pixels stored in bf16 (rounded the
same way, to nearest even) give the vision tower bit for bit the same input (tested)."""


def pixel_storage(policy: str, compute_dtype: torch.dtype, model_type: str | None) -> str:
    """The stored form of pixel values for ``policy`` (:data:`PIXEL_POLICIES`): ``auto`` is ``bfloat16`` when the
    model computes in bf16 and rounds its float32 pixels to bf16 itself (:data:`BF16_EXACT`), else ``float32``."""
    if policy not in PIXEL_POLICIES:
        raise DeltakitError(f"cache pixels must be one of {', '.join(PIXEL_POLICIES)}, not {policy!r}")
    if policy != "auto":
        return policy
    return "bfloat16" if compute_dtype == torch.bfloat16 and model_type in BF16_EXACT else "float32"


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
              cutoff_policy: str, template_kwargs: dict[str, Any], pixels: str = "float32") -> tuple[str, dict[str, Any]]:
    """The entry name (hex SHA-256) and the parts it is computed from (stored in ``index.json``); ``pixels`` is
    the stored form of the pixel values (``float32``, ``bfloat16`` or ``none``, :func:`pixel_storage`)."""
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
        "pixels": pixels,
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


def _image_stat(path: Path) -> tuple[str, int, int]:
    """An image file as the cache records it: resolved path, size in bytes, modification time (ns)."""
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


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
    """Encode every example of ``dataset`` (``workers`` DataLoader processes, in order) into ``folder``, pixel
    values stored as ``parts["pixels"]`` says (``float32``, ``bfloat16`` or ``none``)."""
    pixels = parts["pixels"]
    images: list[list[tuple[str, int, int]]] = []
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
            item = dict(enc.item)
            if PIXELS in item and pixels == "none":
                del item[PIXELS]
            elif PIXELS in item and pixels == "bfloat16":
                item[PIXELS] = item[PIXELS].to(torch.bfloat16)
            builder.add(index, item)
            images.append([_image_stat(p) for p in dataset.examples[index].images])
        progress(1)
    builder.flush()
    if not builder.shards:
        raise DeltakitError(f"{parts['data']}: every one of {len(dataset)} examples was dropped by the cutoff "
                            f"({parts['cutoff_len']} tokens), e.g. {stats.dropped[0] if stats.dropped else ''}")
    index = {"format": FORMAT_VERSION, "key": parts, "examples": sum(s["examples"] for s in builder.shards),
             "shards": builder.shards, "keys": builder.keys, "stats": stats.to_dict(), "images": images}
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")


class CachedDataset(Sequence):
    """The items of a cache entry (:func:`cached_dataset`), read through memory maps.

    ``dataset[i]`` is the dict of tensors :class:`~deltakit.data.SFTDataset` gave for the ``i``-th kept
    example (``source[i]`` is its index in the data file); ``lengths`` are their token counts, ``stats`` the
    cutoff counts of the build. Per-image tensors are read-only views of the map (a private one: writing to
    them never reaches the file); integer tensors are copies in their original dtype; pixel values are in their
    stored dtype (bf16 for a ``bfloat16`` entry). An entry built with pixels ``none`` needs ``image_processor``
    (the processor's ``image_processor``): each item's images are read and processed again, and the tensors
    it gives besides the pixels (``image_grid_thw``) must equal the stored ones. Picklable, so DataLoader
    workers open their own maps (and do that image processing).
    """

    def __init__(self, folder: str | os.PathLike, image_processor: Any = None):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        if index.get("format") != FORMAT_VERSION:
            raise DeltakitError(f"{self.folder}: cache format {index.get('format')}, this deltakit reads {FORMAT_VERSION}")
        self.index = index
        self.stats: dict[str, Any] = index["stats"]
        self.pixels: str = index["key"]["pixels"]
        self.images: list[list[tuple[str, int, int]]] = [[tuple(x) for x in ex] for ex in index["images"]]
        if self.pixels == "none" and image_processor is None and any(self.images):
            raise DeltakitError(f"{self.folder}: this cache entry stores no pixel values; open it with the processor's image processor "
                                "(CachedDataset(folder, processor.image_processor))")
        self.image_processor = image_processor
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
        if self.pixels == "none" and self.images[index]:
            item.update(self._pixels(index, item))
        return item

    def _pixels(self, index: int, item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pixel values of item ``index``: its images (unchanged since the build: same size and modification time)
        run through the image processor again; what else it gives (the grids) must equal the stored tensors."""
        from deltakit.data import open_image

        for recorded in self.images[index]:
            try:
                now = _image_stat(Path(recorded[0]))
            except OSError:
                now = None
            if now != recorded:
                raise DeltakitError(f"{recorded[0]}: image {'changed' if now else 'gone'} since the data cache {self.folder} was "
                                    "built without pixel values; run again to rebuild it")
        out = self.image_processor(images=[open_image(Path(p), p) for p, _, _ in self.images[index]], return_tensors="pt")
        for name, t in out.items():
            if name != PIXELS and name in item and not torch.equal(item[name], t.to(item[name].dtype)):
                raise DeltakitError(f"{self.folder}: the image processor gives {name} {t.tolist()} for example {self.source[index]}, "
                                    f"the cache {item[name].tolist()}")
        return {PIXELS: out[PIXELS]}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": None, "_files": [], "_pid": -1}


def cached_dataset(data: str | os.PathLike, processor: Any, *, examples: Sequence[Example] | None = None,
                   max_length: int | None = None, cutoff_policy: str = "truncate",
                   template_kwargs: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                   workers: int = 0, pixels: str = "float32", progress: ProgressFn = no_progress) -> CachedDataset:
    """The processed examples of the training JSONL ``data``: opened from the cache, or built into it first.

    ``examples`` (default ``load_examples(data)``) must be that file's records. One process builds an
    entry while the others wait on its lock (see the module docstring); ``workers`` DataLoader processes run
    the processor in parallel during a build. ``pixels`` is the stored form of the pixel values (``float32``,
    ``bfloat16``, ``none``; :func:`pixel_storage` resolves ``auto``).
    """
    from deltakit.data import load_examples
    from deltakit.io.writer import atomic_output_dir

    template_kwargs = dict(template_kwargs or {})
    examples = load_examples(data) if examples is None else examples
    if pixels not in PIXEL_POLICIES[1:]:
        raise DeltakitError(f"pixels must be one of {', '.join(PIXEL_POLICIES[1:])} (resolve auto with pixel_storage), not {pixels!r}")
    key, parts = cache_key(data, examples, processor, max_length, cutoff_policy, template_kwargs, pixels)
    folder = cache_root(cache_dir) / "sft" / key
    with _locked(folder.with_name(key + ".lock")):
        if not (folder / "index.json").is_file():
            log.info("processing %d examples of %s into the data cache %s", len(examples), data, folder)
            dataset = SFTDataset(examples, processor, max_length, cutoff_policy, template_kwargs)
            with atomic_output_dir(folder, overwrite=folder.exists()) as tmp:
                build_entry(tmp, dataset, parts, workers, progress)
        else:
            log.info("data cache hit: %s", folder)
        return CachedDataset(folder, getattr(processor, "image_processor", None) if pixels == "none" else None)


def build_workers() -> int:
    """Processes that run the processor while an entry is built: one per CPU core this process may use but one (the
    building process writes the shards; the other ranks wait for it), at most 8; none on 1 or 2 cores, where moving
    each example's pixels between processes costs more than the second core gains (docs/benchmarks.md)."""
    from deltakit.train.loader import in_daemon

    if in_daemon():
        return 0  # a daemonic process (a pool worker) cannot start children
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores - 1) if cores > 2 else 0


@dataclass
class CacheRequest:
    """Everything :func:`cached_dataset` needs, to be opened later (by the training loop, with its progress bar);
    ``workers`` None = :func:`build_workers`; ``pixels`` a :data:`PIXEL_POLICIES` value, ``auto`` resolved with
    ``compute_dtype`` and ``model_type`` (set by the loop once the model and precision are known)."""

    data: str | os.PathLike
    processor: Any
    max_length: int | None = None
    cutoff_policy: str = "truncate"
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | os.PathLike | None = None
    workers: int | None = None
    pixels: str = "auto"
    compute_dtype: torch.dtype = torch.float32
    model_type: str | None = None

    def open(self, progress: ProgressFn = no_progress) -> CachedDataset:
        return cached_dataset(self.data, self.processor, max_length=self.max_length, cutoff_policy=self.cutoff_policy,
                              template_kwargs=self.template_kwargs, cache_dir=self.cache_dir,
                              workers=build_workers() if self.workers is None else self.workers,
                              pixels=pixel_storage(self.pixels, self.compute_dtype, self.model_type), progress=progress)
