"""The safetensors file format, read and written by hand so that every byte is under our control.

A file is ``u64 little-endian header length | JSON header | data``; the header maps tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data start) and may hold
``__metadata__`` (a str -> str dict).
"""

from __future__ import annotations

import json
import struct
from math import prod

import torch

from deltakit.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


_MAX_INDEX = 2**63 - 1  # torch's int64 sizes and strides


def _is_size(v: object) -> bool:
    """A JSON integer >= 0 (not a bool, float or string)."""
    return type(v) is int and v >= 0


def _indexable(shape: list[int]) -> bool:
    """Whether torch can index ``shape``: the product of its sizes (zeros counted as 1) fits an int64."""
    total = 1
    for s in shape:
        total *= max(s, 1)
        if total > _MAX_INDEX:
            return False
    return True


def _short(v: object) -> str:
    """A header value for an error message: its repr, cut to one short line."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_problem(exc: Exception) -> str:
    """Why a header did not decode, in a few words."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 at byte {exc.start}"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc.msg} at byte {exc.pos}"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return "a number with too many digits" if "digits" in str(exc) else "not valid JSON"


def parse_header(raw: bytes, file_size: int, path: str) -> tuple[dict, dict[str, str], int]:
    """Parse and validate a safetensors header.

    ``raw`` holds at least the first ``8 + header_len`` bytes of the file. Returns
    ``(entries, metadata, data_start)``; raises :class:`CheckpointError` (one line) on any inconsistency:
    a header that is not UTF-8 JSON, a ``__metadata__`` that is not str -> str, an unknown dtype, a shape
    or ``data_offsets`` that are not non-negative integers (or a shape too large for torch to index), a
    byte count that does not match the shape, or data that would lie past the end of a truncated file.
    Out-of-order offsets are accepted; two tensors sharing bytes, or one name given twice, are refused
    (as the reference safetensors reader does: a file like that is corrupt or crafted).
    """
    if len(raw) < 8 or file_size < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or 8 + n > file_size:
        raise CheckpointError(f"{path}: corrupt safetensors header (header length {n} does not fit the file)")
    try:
        header = json.loads(raw[8 : 8 + n], object_pairs_hook=_unique_keys)
    except _DuplicateName as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (duplicate name {exc.name!r})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: corrupt safetensors header ({_json_problem(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings to strings)")
    data_start = 8 + n
    data_len = file_size - data_start
    for name, e in header.items():
        if not isinstance(e, dict) or not all(k in e for k in ("dtype", "shape", "data_offsets")):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r} (needs dtype, shape and data_offsets)")
        dtype = DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {_short(e['dtype'])} "
                                  f"(supported: {', '.join(DTYPES)})")
        shape, offsets = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not all(_is_size(s) for s in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {_short(shape)}, not a list of non-negative integers")
        if not _indexable(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {_short(shape)}, too large to index")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {_short(offsets)}, "
                                  "not two non-negative integers (begin, end)")
        begin, end = offsets
        if end - begin != prod(shape) * element_size(dtype):
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {_short(shape)} {e['dtype']}")
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, file has {file_size}"
            )
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items()
                   if e["data_offsets"][1] > e["data_offsets"][0])
    for (_, end0, n0), (begin1, end1, n1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap (their data_offsets share bytes "
                                  f"[{begin1}, {min(end0, end1)}))")
    return header, dict(metadata), data_start


class _DuplicateName(ValueError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads`` object hook: a name given twice is an error (``json`` would keep the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateName(key)
        out[key] = value
    return out


def build_header(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """Lay out tensors back to back and return ``(header bytes incl. length prefix and padding, offsets)``.

    ``offsets[name]`` is the absolute file offset of the tensor's first byte. The header is padded with
    spaces to a multiple of 8 bytes, as the reference implementation does, so data stays aligned.
    """
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    rel: dict[str, int] = {}
    pos = 0
    for name, dtype, shape in specs:
        nbytes = prod(shape) * element_size(dtype)
        entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        rel[name] = pos
        pos += nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    start = 8 + len(body)
    return struct.pack("<Q", len(body)) + body, {k: start + v for k, v in rel.items()}
