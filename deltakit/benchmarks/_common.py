"""Small helpers the benchmark readers share."""

from __future__ import annotations

import ast
import math
from typing import Any

from deltakit.data import DataError


def text(rec: dict[str, Any], key: str, where: str, required: bool = True) -> str | None:
    """``rec[key]`` as text (numbers as written); a missing required field is one error line."""
    value = rec.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise DataError(f"{where}: missing {key!r}")
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def str_list(value: Any, where: str, key: str) -> list[str] | None:
    """A list of strings from a list, a numpy array, or a TSV cell holding a Python/JSON list; None when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(f"{where}: {key!r} is not a list ({value[:60]!r})") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {key!r} must be a list")
    return [str(v) for v in value] or None


def values(value: Any) -> list[str]:
    """A category cell as a list of values (a list stays a list; None gives none)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return []
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)
            if isinstance(parsed, list):
                return [str(v) for v in parsed]
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def plain(rec: dict[str, Any]) -> dict[str, Any]:
    """The record without image bytes (kept for prompt templates and the VLMEvalKit export)."""
    from deltakit.benchmarks.files import IMAGE_COLUMNS

    out = {}
    for k, v in rec.items():
        if k in IMAGE_COLUMNS and not isinstance(v, str):
            continue  # image bytes (parquet structs, decoded TSV cells); a path string is kept
        if hasattr(v, "tolist"):
            v = v.tolist()
        out[k] = v
    return out


def vlmevalkit(rec: dict[str, Any]) -> bool:
    """Whether a record is a row of a VLMEvalKit TSV (its ``index`` column; no published file of the benchmarks has one)."""
    return "index" in rec


def metadata(rec: dict[str, Any]) -> dict[str, Any]:
    """The record's ``metadata``: a dict (parquet, JSON) or, in a VLMEvalKit TSV, its Python text (VLMEvalKit's
    ``utils/mathverse.py`` reads it the same way); {} when absent or unreadable."""
    meta = rec.get("metadata")
    if isinstance(meta, str):
        try:
            meta = ast.literal_eval(meta)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return {}
    return meta if isinstance(meta, dict) else {}
