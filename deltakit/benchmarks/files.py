"""Reading benchmark files as published: rows (dicts) from parquet, JSON, JSONL or VLMEvalKit TSV, and their images.

- parquet (Hugging Face datasets): image columns are ``{"bytes": ..., "path": ...}`` structs (the ``Image``
  feature) or path strings;
- JSON: a list of records, or an object of records keyed by id (MathVista's ``testmini.json``, LogicVista's
  ``dataset.json``); the key is kept as ``_key``;
- JSONL: one record a line;
- TSV (VLMEvalKit's ``LMUData`` files): an ``index`` column; ``image`` holds base64 image bytes, a Python list
  of them (several images), or, when 64 characters or fewer, the ``index`` of the row whose image it shares
  (``vlmeval/dataset/image_base.py``, ``ImageBaseDataset.__init__``).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltakit.data import DataError, iter_jsonl

FORMATS = ("parquet", "json", "jsonl", "tsv")
# Columns that may hold a record's image, in the order they are tried.
IMAGE_COLUMNS = ("decoded_image", "image", "image_path", "imagename")


@dataclass(frozen=True)
class Image:
    """One image of a question: a file, or encoded bytes (parquet struct, base64 TSV cell)."""

    path: Path | None = None
    data: bytes | None = None

    def open(self, where: str = "") -> Any:
        """The image as an RGB ``PIL.Image``; an unreadable one is a :class:`DataError` naming ``where``."""
        from PIL import Image as PILImage

        try:
            with PILImage.open(self.path if self.path is not None else io.BytesIO(self.data or b"")) as im:
                return im.convert("RGB")
        except (OSError, ValueError, PILImage.DecompressionBombError) as exc:
            raise DataError(f"{where}: cannot read its image ({exc})") from None


def file_format(path: Path, given: str | None = None) -> str:
    """The file layout: ``given`` or the extension (``.parquet``, ``.json``, ``.jsonl``, ``.tsv``)."""
    fmt = given or path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown benchmark file type {path.suffix!r}; expected .parquet, .json, .jsonl or .tsv")
    return fmt


def read_rows(path: str | os.PathLike) -> list[tuple[dict[str, Any], str]]:
    """Every record of a benchmark file with where it is (``file:line``, ``file[key]``, ``file row N``), in file order;
    a folder holding one benchmark file is read as that file."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in (".parquet", ".json", ".jsonl", ".tsv"))
        if len(found) != 1:
            raise DataError(f"{path}: a folder must hold exactly one .parquet/.json/.jsonl/.tsv file (found {len(found)}); give the file")
        path = found[0]
    if not path.is_file():
        raise DataError(f"{path}: benchmark file not found")
    fmt = file_format(path)
    rows = {"parquet": _parquet, "json": _json, "jsonl": _jsonl, "tsv": _tsv}[fmt](path)
    if not rows:
        raise DataError(f"{path}: no questions")
    if fmt == "jsonl":
        return rows
    if fmt == "json":
        return [(r, f"{path}[{r['_key']!r}]" if "_key" in r else f"{path}[{i}]") for i, r in enumerate(rows)]
    if fmt == "tsv":
        return [(r, f"{path} index {r['index']}") for r in rows]
    return [(r, f"{path} row {i + 1}") for i, r in enumerate(rows)]


def _parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq
    from pyarrow import ArrowException

    try:
        return pq.read_table(path).to_pylist()
    except (ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None


def _json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        return [{"_key": k, **v} for k, v in data.items()]
    if isinstance(data, list) and all(isinstance(v, dict) for v in data):
        return data
    raise DataError(f"{path}: expected a list of records or an object of records keyed by id")


def _jsonl(path: Path) -> list[tuple[dict[str, Any], str]]:
    rows = []
    for rec, where in iter_jsonl(path, "benchmark file"):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a record must be a JSON object")
        rows.append((rec, where))
    return rows


def _tsv(path: Path) -> list[dict[str, Any]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            rows = [dict(r) for r in csv.DictReader(fh, delimiter="\t")]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable TSV file ({exc})") from None
    if rows and "index" not in rows[0]:
        raise DataError(f"{path}: a VLMEvalKit TSV needs an 'index' column")
    # An image cell of 64 characters or fewer is the index of the row whose image it shares.
    by_index = {str(r["index"]): r.get("image") for r in rows}
    for r in rows:
        image = r.get("image")
        if image is not None and 0 < len(image) <= 64:
            target = by_index.get(image)
            if target is None or len(target) <= 64:
                raise DataError(f"{path}: row index {r['index']}: image refers to index {image!r}, which has no image")
            r["image"] = target
        for key, value in list(r.items()):
            if value == "":
                r[key] = None  # pandas reads an empty TSV cell as NaN
    for r in rows:  # VLMEvalKit's image column is base64 (decode_base64_to_image_file), one or a list of them
        if r.get("image"):
            try:
                decoded = [base64.b64decode(v) for v in _maybe_list(r["image"])]
            except (binascii.Error, ValueError) as exc:
                raise DataError(f"{path}: row index {r['index']}: the image cell is not base64 ({exc})") from None
            r["image"] = decoded[0] if len(decoded) == 1 else decoded
    return rows


def images_of(rec: dict[str, Any], base: Path, where: str) -> list[Image]:
    """The images of a record: the first of :data:`IMAGE_COLUMNS` it has, decoded or resolved under ``base``."""
    for col in IMAGE_COLUMNS:
        value = rec.get(col)
        if value is None or value == "" or value == []:
            continue
        return [_one_image(v, base, where) for v in (value if isinstance(value, list) else _maybe_list(value))]
    return []


def _maybe_list(value: Any) -> list[Any]:
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)  # VLMEvalKit's toliststr: a list of base64 strings or paths
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return [value]
        if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
            return parsed
    return [value]


def _one_image(value: Any, base: Path, where: str) -> Image:
    if isinstance(value, dict):  # the Hugging Face Image feature
        if value.get("bytes"):
            return Image(data=bytes(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image(data=bytes(value))
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: cannot read an image from {type(value).__name__} {str(value)[:40]!r}")
    for candidate in (base / value, base / "images" / Path(value).name):
        if candidate.is_file():
            return Image(path=candidate)
    raise DataError(f"{where}: image not found: {base / value}")
