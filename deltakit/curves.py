"""Run curves: TensorBoard event files written without TensorBoard, and a PNG of a run's curves.

:class:`EventWriter` writes scalars in TensorBoard's event-file format (a TFRecord file of ``Event``
protocol buffers, ``tensorboard --logdir`` reads it), encoded here by hand: it is a small, frozen format
(``Event{wall_time=1: double, step=2: int64, file_version=3: string, summary=5: Summary}``,
``Summary{value=1: repeated Value{tag=1: string, simple_value=2: float}}``, each record framed as
``uint64 length, masked crc32c(length), data, masked crc32c(data)``), so training needs neither the
``tensorboard`` package nor TensorFlow (the tests read the files back with TensorBoard's own reader).
:func:`plot_curves` draws the curves of a run's log records with matplotlib.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CURVES = {  # log record key -> (TensorBoard tag, plot title)
    "loss": ("train/loss", "loss (mean token cross-entropy)"),
    "lr": ("train/lr", "learning rate"),
    "grad_norm": ("train/grad_norm", "gradient norm (before clipping)"),
    "tokens_per_s": ("train/tokens_per_s", "tokens per second"),
    "data_share": ("train/data_wait_share", "share of the step waiting for data"),
    "drift_cos": ("drift/cos_g_D", "DRIFT cos(g, D)"),
    "drift_ratio": ("drift/bias_ratio", "DRIFT |sum c D| / |g|"),
}


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord frames use it."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative values
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int | None = None, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    out = b"\x09" + struct.pack("<d", wall_time)
    if step is not None:
        out += b"\x10" + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)) for tag, value in scalars.items())
        out += _field(5, values)
    return out


class EventWriter:
    """Scalars into one TensorBoard event file in ``folder`` (``events.out.tfevents.<time>.<host>.<pid>``).

    Each :meth:`add` is written and flushed at once, so TensorBoard shows a live run.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.deltakit"
        self._f = self.path.open("wb")
        self._write(_event(now, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        head = struct.pack("<Q", len(record))
        self._f.write(head + struct.pack("<I", _masked(crc32c(head))) + record + struct.pack("<I", _masked(crc32c(record))))
        self._f.flush()

    def add(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        """One event at ``step`` holding ``{tag: value}``."""
        self._write(_event(time.time() if wall_time is None else wall_time, step, scalars=scalars))

    def close(self) -> None:
        self._f.close()


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a training log record (the keys of :data:`CURVES` it has)."""
    return {CURVES[k][0]: float(record[k]) for k in CURVES if record.get(k) is not None}


def plot_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """A PNG of the run's curves (one panel per :data:`CURVES` key the records have) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in CURVES if any(r.get(k) is not None for r in records)]
    cols = min(4, max(1, len(keys)))
    rows = max(1, -(-len(keys) // cols))
    height = 2.8 * rows + 0.3
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, height), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.5 / height, top=1 - (0.75 if title else 0.4) / height, wspace=0.3, hspace=0.6)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None, lw=1.2)
        ax.set_title(CURVES[key][1], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
