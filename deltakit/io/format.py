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


def parse_header(raw: bytes, file_size: int, path: str) -> tuple[dict, dict[str, str], int]:
    """Parse and validate a safetensors header.

    ``raw`` holds at least the first ``8 + header_len`` bytes of the file. Returns
    ``(entries, metadata, data_start)``; raises :class:`CheckpointError` on any inconsistency,
    including data that would lie past the end of a truncated file.
    """
    if len(raw) < 8 or file_size < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or 8 + n > file_size:
        raise CheckpointError(f"{path}: corrupt safetensors header (header length {n} does not fit the file)")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = file_size - data_start
    for name, e in header.items():
        try:
            dtype = DTYPES[e["dtype"]]
            shape = [int(s) for s in e["shape"]]
            begin, end = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if end - begin != prod(shape) * element_size(dtype) or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {e['dtype']}")
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, file has {file_size}"
            )
    return header, dict(metadata), data_start


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
