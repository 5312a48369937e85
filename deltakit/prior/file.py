"""Reading a prior file: :class:`Prior` validates the header and the stored parts, and expands tensors on :meth:`Prior.get`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from deltakit import __version__
from deltakit.engine.selection import MODULE_KINDS
from deltakit.families import classify_canonical
from deltakit.io.checkpoint import Checkpoint
from deltakit.prior.encodings import ENCODINGS, PriorError

FORMAT = "deltakit-prior"
FORMAT_VERSION = 1
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
REQUIRED = ("format_version", "family", "sources", "modules", "layers", "skip_first", "dtype", "normalize",
            "compression", "tensors", "totals", "deltakit_version")
JSON_KEYS = ("sources", "modules", "layers", "normalize", "compression", "alpha", "notes", "tensors", "totals", "skip_first",
             "selection")


def cosine(dot: float, a_sq: float, b_sq: float) -> float:
    """cos from a dot product and two squared norms (1 for two zero vectors, 0 for one), clamped to [-1, 1]."""
    if a_sq == 0.0 and b_sq == 0.0:
        return 1.0
    if a_sq == 0.0 or b_sq == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(a_sq * b_sq)))


def per_module(entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-module-kind totals of a prior's per-tensor entries: tensors, params, |D|, |W|, |D|/|W|, bytes, fidelity."""
    groups: dict[str, dict[str, float]] = {}
    for e in entries.values():
        g = groups.setdefault(e["kind"], {"tensors": 0, "params": 0, "d_sq": 0.0, "w_sq": 0.0, "ref_sq": 0.0,
                                          "dot": 0.0, "rec_sq": 0.0, "bytes": 0})
        ref, rec = e["d_norm"] * e["scale"], e["stored_norm"]
        g["tensors"] += 1
        g["params"] += math.prod(e["shape"])
        g["d_sq"] += e["d_norm"] ** 2
        g["w_sq"] += e["w_norm"] ** 2
        g["bytes"] += e["bytes"]
        g["ref_sq"] += ref**2
        g["dot"] += e["cosine"] * ref * rec
        g["rec_sq"] += rec**2
    order = {k: i for i, k in enumerate(MODULE_KINDS + ("norm", "embed", "lm_head"))}
    modules = {}
    for kind in sorted(groups, key=lambda k: order.get(k, len(order))):
        g = groups[kind]
        d, w = math.sqrt(g["d_sq"]), math.sqrt(g["w_sq"])
        modules[kind] = {"tensors": g["tensors"], "params": g["params"], "d_norm": d, "w_norm": w,
                         "ratio": d / w if w else None, "bytes": g["bytes"],
                         "cosine": cosine(g["dot"], g["ref_sq"], g["rec_sq"])}
    return modules


class Prior:
    """A prior file written by :func:`export_prior`: validated on open, tensors expanded on :meth:`get`.

    ``names`` are canonical text-tower names, ``family`` the MLLM family it was built for, ``metadata``
    the parsed header metadata (JSON values decoded), ``entries`` the per-tensor manifest.
    """

    def __init__(self, path: Path, ckpt: Checkpoint, metadata: dict[str, Any]):
        self.path = path
        self._ckpt = ckpt
        self.metadata = metadata
        self.family: str = metadata["family"]
        self.entries: dict[str, dict[str, Any]] = metadata["tensors"]
        self.names: list[str] = list(self.entries)
        self.dtype: torch.dtype = DTYPES[metadata["dtype"]]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Prior":
        """Open and validate a prior (a .safetensors file, or a folder holding exactly one)."""
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise PriorError(f"{path}: a prior folder must hold exactly one .safetensors file, found {len(files)}")
            path = files[0]
        ckpt = Checkpoint.open(path)
        raw = ckpt.metadata()
        if raw.get("format") != FORMAT:
            raise PriorError(f"{path}: not a deltakit prior (no '{FORMAT}' metadata; write one with `deltakit prior`)")
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise PriorError(f"{path}: prior metadata lacks {missing[0]!r} (damaged or hand-edited file)")
        if raw["format_version"] != str(FORMAT_VERSION):
            raise PriorError(f"{path}: prior format version {raw['format_version']}, this deltakit {__version__} reads {FORMAT_VERSION}")
        meta: dict[str, Any] = {}
        for k, v in raw.items():
            try:
                meta[k] = json.loads(v) if k in JSON_KEYS else v
            except json.JSONDecodeError:
                raise PriorError(f"{path}: prior metadata {k!r} is not valid JSON (damaged file)") from None
        if meta["dtype"] not in DTYPES or not isinstance(meta["tensors"], dict):
            raise PriorError(f"{path}: prior metadata has an unknown dtype {meta['dtype']!r} or no tensor table")
        prior = cls(path, ckpt, meta)
        prior._validate(ckpt)
        return prior

    def _validate(self, ckpt: Checkpoint) -> None:
        expected: set[str] = set()
        for name, e in self.entries.items():
            if not isinstance(e, dict) or classify_canonical(name)[1] == "other":
                raise PriorError(f"{self.path}: unknown tensor name {name!r} (not a canonical text-tower name)")
            enc = e.get("encoding")
            if enc not in ENCODINGS or not isinstance(e.get("shape"), list):
                raise PriorError(f"{self.path}: tensor {name!r} has an unknown encoding {enc!r} or no shape")
            shape = tuple(e["shape"])
            for part in ENCODINGS[enc].parts:
                key = ENCODINGS[enc].key(name, part)
                if key not in ckpt:
                    raise PriorError(f"{self.path}: tensor {key!r} listed in the metadata is missing from the file")
                expected.add(key)
            got = {p: tuple(ckpt.meta(ENCODINGS[enc].key(name, p)).shape) for p in ENCODINGS[enc].parts}
            if not ENCODINGS[enc].fits(got, shape):
                raise PriorError(f"{self.path}: stored parts of {name!r} {got} do not fit shape {list(shape)} ({enc})")
        extra = [k for k in ckpt.keys() if k not in expected]
        if extra:
            raise PriorError(f"{self.path}: unknown tensor {extra[0]!r} not listed in the prior metadata ({len(extra)} such)")

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of D for ``name`` (the MLLM parameter's shape)."""
        return tuple(self._entry(name)["shape"])

    def alpha(self, name: str) -> float:
        """The per-module alpha stored for ``name`` (1.0 unless exported with ``alpha``)."""
        return float(self._entry(name).get("alpha", 1.0))

    def get(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """D for ``name`` as a new tensor, in the prior's dtype unless ``dtype`` is given; compressed priors are expanded."""
        e = self._entry(name)
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else torch.device("cpu")
        if e["encoding"] == "full":
            return self._ckpt.get(name).to(device=device, dtype=dtype, copy=True)
        enc = ENCODINGS[e["encoding"]]
        parts = {p: self._ckpt.get(enc.key(name, p)).to(device) for p in enc.parts}
        return enc.expand(parts, tuple(e["shape"])).to(dtype)

    def summary(self) -> dict[str, Any]:
        """Metadata plus the per-module totals of :func:`per_module`, for ``inspect``."""
        meta = {k: v for k, v in self.metadata.items() if k != "tensors"}
        return {"path": str(self.path), "bytes_on_disk": self.path.stat().st_size, **meta, "per_module": per_module(self.entries)}

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self.entries[name]
        except KeyError:
            raise PriorError(f"{self.path}: no tensor {name!r} in this prior") from None

    def close(self) -> None:
        self._ckpt.close()

    def __repr__(self) -> str:
        return f"Prior({str(self.path)!r}, {self.family}, {len(self)} tensors)"
