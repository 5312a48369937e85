"""Prediction files: reading them (JSONL, VLMEvalKit ``.xlsx``/``.tsv``) and writing VLMEvalKit's prediction TSV."""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltakit.benchmarks.files import IMAGE_COLUMNS
from deltakit.data import DataError, iter_jsonl

if TYPE_CHECKING:
    from deltakit.benchmarks.core import Benchmark, Item

TEXT_FIELDS = ("prediction", "response", "output")
"""Where a predictions record holds the model's raw output, in the order tried."""


def read_predictions(path: str | os.PathLike, bench: Benchmark) -> dict[str, Any]:
    """Item id -> raw model output. A record's id is its ``id`` field, else the benchmark's own id field
    (``pid``, ``sample_index`` ...) or VLMEvalKit's ``index``. A repeated id keeps its last prediction (an
    appended-to file, as a resumed run writes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        records = list(_xlsx(path))
    elif suffix in (".tsv", ".csv"):
        records = list(_table(path, "\t" if suffix == ".tsv" else ","))
    else:
        records = []
        for rec, where in iter_jsonl(path, "predictions file"):
            if not isinstance(rec, dict):
                raise DataError(f"{where}: a prediction must be a JSON object")
            records.append((rec, where))
    out: dict[str, Any] = {}
    for rec, where in records:
        field = next((f for f in TEXT_FIELDS if f in rec), None)
        if field is None:
            raise DataError(f"{where}: no 'prediction' field")
        key = rec["id"] if rec.get("id") not in (None, "") else bench.id_of(rec, where)
        out[str(key)] = rec[field]
    return out


def _xlsx(path: Path):
    from openpyxl import load_workbook

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # noqa: BLE001 - openpyxl raises many types for a file that is not a workbook
        raise DataError(f"{path}: not a readable .xlsx file ({type(exc).__name__}: {exc})") from None
    try:
        rows = book.worksheets[0].iter_rows(values_only=True)
        header = [str(h) for h in next(rows, ())]
        for n, values in enumerate(rows, 2):
            rec = dict(zip(header, values))
            if rec.get("index") is not None:
                rec["index"] = _index_text(rec["index"])
            yield rec, f"{path}:{n}"
    finally:
        book.close()


def _index_text(value: Any) -> str:
    """A spreadsheet index cell as the text VLMEvalKit compares (``12.0`` read back as ``12``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _table(path: Path, delimiter: str):
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as fh:
        for n, rec in enumerate(csv.DictReader(fh, delimiter=delimiter), 2):
            yield rec, f"{path}:{n}"


def vlmevalkit_rows(items: list[Item], predictions: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """VLMEvalKit's prediction table: the benchmark file's columns without the image ones, plus ``prediction``
    (``index`` first; added from the item id when the file had none)."""
    by_id = {p["id"]: p["prediction"] for p in predictions}
    columns: list[str] = ["index"]
    for it in items:
        for k in it.record:
            if k not in columns and k not in IMAGE_COLUMNS and not k.startswith("_"):
                columns.append(k)
    columns.append("prediction")
    rows = []
    for it in items:
        if it.id not in by_id:
            continue
        rec = {"index": it.id, **{k: v for k, v in it.record.items() if k != "index"}, "prediction": by_id[it.id]}
        if "index" in it.record:
            rec["index"] = it.record["index"]
        rows.append(["" if rec.get(c) is None else str(rec.get(c)) for c in columns])
    return columns, rows


def write_vlmevalkit_tsv(path: str | os.PathLike, items: list[Item], predictions: list[dict[str, Any]]) -> None:
    """Write :func:`vlmevalkit_rows` as a TSV (atomically), for VLMEvalKit's own scorers."""
    from deltakit.io.writer import write_file_atomic

    columns, rows = vlmevalkit_rows(items, predictions)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    write_file_atomic(Path(path), buf.getvalue().encode())
