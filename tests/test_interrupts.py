"""Bad input at scale: a disk that fills, SIGINT/SIGTERM, and shards cut after their header was read.

Whatever goes wrong, ``merge`` and ``prior`` leave nothing under the output name and no temporary
``.NAME.xxxx.tmp`` beside it, and the CLI ends with one ``error:`` line (or ``aborted``) and a non-zero code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from deltakit.cli import main
from deltakit.diagnostics import diff
from deltakit.errors import CheckpointError, OutputError
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.format import build_header
from deltakit.io.writer import atomic_output_dir, write_file_atomic
from deltakit.merge import MergeConfig, merge
from deltakit.model import open_model
from deltakit.prior import export_prior
from deltakit.tiny import save_partner_llm

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # seconds a subprocess may take to start (imports on a loaded machine) or to finish
SHARD = "model.safetensors"
BIG_FACTOR = 48  # text-layer tensors of the tiny pair grown 48x per dimension: ~170 MB per model, ~2 s of merge


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2.5-VL and a partner LLM (read-only)."""
    vl = tiny_checkpoint("qwen2_5_vl")
    return {"vl": vl, "llm": save_partner_llm(vl, tmp_path_factory.mktemp("interrupts") / "llm")}


def _inflate(src: Path, dst: Path, factor: int) -> Path:
    """A copy of checkpoint ``src`` whose text-layer tensors are ``factor`` times larger per dimension.

    The data is a sparse file of zeros (nothing is written but the header), so a checkpoint that takes
    seconds to merge costs no time or disk to make.
    """
    m = open_model(src)
    dst.mkdir(parents=True)
    for f in m.ckpt.non_weight_files():
        shutil.copy2(f, dst / f.name)
    specs = []
    for key in m.ckpt.keys():
        meta, info = m.ckpt.meta(key), m.infos[key]
        grow = info.role == "text" and info.layer is not None
        specs.append((key, meta.dtype, tuple(d * factor for d in meta.shape) if grow else meta.shape))
    m.ckpt.close()
    header, _ = build_header(specs, {"format": "pt"})
    with open(dst / SHARD, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(torch.Size(s).numel() * d.itemsize for _, d, s in specs))
    return dst


@pytest.fixture(scope="module")
def big_pair(pair, tmp_path_factory) -> dict[str, Path]:
    """The tiny pair with large text layers (read-only; copy a model before cutting it)."""
    root = tmp_path_factory.mktemp("big")
    return {k: _inflate(pair[k], root / k, BIG_FACTOR) for k in ("vl", "llm")}


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _cli(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process: exit code and stderr."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def _one_error(err: str, *parts: str) -> None:
    """``err`` is exactly one ``error:`` line and names every one of ``parts``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    flat = " ".join(lines[0].split())
    for part in parts:
        assert part in flat, (part, flat)


# --------------------------------------------------------------------------------------------- a disk that fills
class FullDisk:
    """``os.pwrite``/``os.write`` to files under ``root`` fail with ENOSPC once ``room`` bytes were written there.

    The write that crosses the limit is short (as on a real disk), the next one fails; files elsewhere
    (the inputs, pytest's own) are not touched.
    """

    def __init__(self, root: Path, room: int):
        self.root = f"{root}{os.sep}"
        self.room = room
        self.refused = 0
        self._lock = threading.Lock()
        self._pwrite, self._write = os.pwrite, os.write

    def _allow(self, fd: int, n: int) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(self.root):
            return n
        with self._lock:
            if self.room == 0:
                self.refused += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = min(n, self.room)
            self.room -= n
            return n

    def pwrite(self, fd: int, data, offset: int) -> int:
        n = self._allow(fd, len(memoryview(data).cast("B")))
        return self._pwrite(fd, memoryview(data).cast("B")[:n], offset)

    def write(self, fd: int, data) -> int:
        n = self._allow(fd, len(memoryview(data).cast("B")))
        return self._write(fd, memoryview(data).cast("B")[:n])


@pytest.fixture
def full_disk(monkeypatch) -> Callable[[Path, int], FullDisk]:
    def install(root: Path, room: int) -> FullDisk:
        disk = FullDisk(root, room)
        monkeypatch.setattr(os, "pwrite", disk.pwrite)
        monkeypatch.setattr(os, "write", disk.write)
        return disk

    return install


@pytest.mark.parametrize("room", [0, 16384], ids=["full-at-start", "fills-mid-write"])
def test_merge_on_a_full_disk_raises_output_error_and_leaves_nothing(pair, tmp_path, full_disk, room):
    disk = full_disk(tmp_path, room)
    with pytest.raises(OutputError) as exc:
        merge(MergeConfig.simple(str(pair["vl"]), str(pair["llm"])), tmp_path / "out", threads=2)
    assert disk.refused and exc.value.path == (tmp_path / "out").absolute()
    assert str(exc.value).startswith(f"{(tmp_path / 'out').absolute()}: disk full")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("room", [0, 16384], ids=["full-at-start", "fills-mid-write"])
def test_prior_on_a_full_disk_raises_output_error_and_leaves_nothing(pair, tmp_path, full_disk, room):
    disk = full_disk(tmp_path, room)
    out = tmp_path / "p.safetensors"
    with pytest.raises(OutputError) as exc:
        export_prior(pair["vl"], pair["llm"], out, dtype="float32")
    assert disk.refused and exc.value.path == out
    assert str(exc.value).startswith(f"{out}: disk full")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["merge", "prior"])
def test_cli_full_disk_is_one_error_line(pair, tmp_path, capsys, full_disk, command):
    out = tmp_path / ("m" if command == "merge" else "p.safetensors")
    full_disk(tmp_path, 16384)
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    code, err = _cli([command, "--mllm", str(pair["vl"]), "--llm", str(pair["llm"]), str(out)], capsys)
    assert code == 1
    _one_error(err, str(out), "disk full")
    assert _leftovers(tmp_path) == []
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # main() put them back


@pytest.mark.parametrize("flag", ["--json", "--csv", "--plot"])
def test_diff_outputs_on_a_full_disk(pair, tmp_path, capsys, full_disk, flag):
    out = tmp_path / f"report.{flag[2:].replace('plot', 'png')}"
    disk = full_disk(tmp_path, 100)
    code, err = _cli(["diff", str(pair["vl"]), str(pair["llm"]), flag, str(out)], capsys)
    assert code == 1 and disk.refused
    _one_error(err, str(out), "disk full")
    assert _leftovers(tmp_path) == []


def test_force_keeps_the_old_output_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # out -> trash worked; tmp -> out fails
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert len(calls) == 3 and _leftovers(tmp_path) == ["out"] and _leftovers(out) == ["old.txt"]


def test_write_file_atomic_through_links_and_pipes(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to("real.json")
    write_file_atomic(tmp_path / "link.json", b"new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"
    assert _leftovers(tmp_path) == ["link.json", "real.json"]
    r, w = os.pipe()  # like --json /dev/stdout: no temporary file can replace a pipe
    try:
        write_file_atomic(f"/proc/self/fd/{w}", b"piped")
        assert os.read(r, 100) == b"piped"
    finally:
        os.close(r)
        os.close(w)


@pytest.fixture
def small_fs(tmp_path) -> Iterator[Path]:
    """A real 32 KiB tmpfs (needs root or CAP_SYS_ADMIN); skipped, with the reason shown by ``-ra``, elsewhere."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small tmpfs; the ENOSPC-by-monkeypatch tests above still ran")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill for real ({done.stderr.strip() or done.returncode}); "
                    "the ENOSPC-by-monkeypatch tests above still ran")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(folder: Path) -> None:
    """Fill the filesystem of ``folder`` to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while f.write(b"\0" * 4096):
            pass


def test_real_full_filesystem(pair, small_fs, capsys):
    out = small_fs / "m"
    proc = subprocess.run([sys.executable, "-m", "deltakit", "merge", "--mllm", str(pair["vl"]), "--llm", str(pair["llm"]),
                           str(out)], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    _one_error(proc.stderr, str(out), "disk full")
    assert _leftovers(small_fs) == []

    prior = small_fs / "p.safetensors"
    code, err = _cli(["prior", "--mllm", str(pair["vl"]), "--llm", str(pair["llm"]), "--dtype", "float32", str(prior)], capsys)
    assert code == 1
    _one_error(err, str(prior), "disk full")
    assert _leftovers(small_fs) == []

    _fill(small_fs)
    report = small_fs / "r.json"
    code, err = _cli(["diff", str(pair["vl"]), str(pair["llm"]), "--json", str(report), "--csv", str(small_fs / "r.csv")], capsys)
    assert code == 1
    _one_error(err, str(report), "disk full")
    assert _leftovers(small_fs) == ["filler"]


# ------------------------------------------------------------------------------------- SIGINT and SIGTERM mid-run
@contextlib.contextmanager
def _signals_not_ignored() -> Iterator[None]:
    """Children inherit an ignored SIGINT/SIGTERM (pytest run as a background job, under nohup) and keep it."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, handler in before.items():
        if handler is signal.SIG_IGN:
            signal.signal(s, signal.SIG_DFL)
    try:
        yield
    finally:
        for s, handler in before.items():
            if handler is signal.SIG_IGN:
                signal.signal(s, handler)


def _written(parent: Path) -> int:
    """Bytes of data on disk in the temporary outputs in ``parent`` (-1 while there is none)."""
    with contextlib.suppress(FileNotFoundError):  # a shard renamed or the output removed meanwhile
        tmps = [p for p in parent.iterdir() if p.name.endswith(".tmp")]
        if tmps:
            return sum(f.stat().st_blocks * 512 for t in tmps for f in ([t] if t.is_file() else t.iterdir()))
    return -1


def _start(args: list[str], parent: Path, logs: Path, written: int = 0) -> tuple[subprocess.Popen, Path]:
    """Start ``python -m deltakit ARGS`` and wait until its temporary output in ``parent`` holds ``written`` bytes.

    The outputs are sparse until written, so with ``written=0`` this returns as soon as the temporary output
    appears. Returns the process and the path of its stderr log.
    """
    err = logs / "stderr.txt"
    with _signals_not_ignored(), open(err, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "deltakit", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err_file)
    deadline = time.monotonic() + TIMEOUT
    while _written(parent) < written:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before its temporary output appeared:\n{err.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no temporary output with {written} bytes in {parent} after {TIMEOUT} s")
        time.sleep(0.002)
    return proc, err


def _finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _big_command(command: str, big_pair: dict[str, Path], out_dir: Path) -> tuple[list[str], Path]:
    out = out_dir / ("merged" if command == "merge" else "prior.safetensors")
    args = [command, "--mllm", str(big_pair["vl"]), "--llm", str(big_pair["llm"]), str(out)]
    return (args + ["--threads", "1"] if command == "merge" else args), out


@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "prior"])
@pytest.mark.parametrize("sig, code, message, written", [
    (signal.SIGINT, 130, "aborted", 0),  # as the temporary output is created
    (signal.SIGTERM, 143, "error: terminated", 2**20),  # while worker threads write into it
], ids=["SIGINT-at-start", "SIGTERM-mid-write"])
def test_signal_mid_run_leaves_nothing(big_pair, tmp_path, command, sig, code, message, written):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args, out = _big_command(command, big_pair, out_dir)
    proc, err = _start(args, out_dir, tmp_path, written)
    proc.send_signal(sig)
    assert _finish(proc) == code, err.read_text()
    assert err.read_text().strip().splitlines()[-1].startswith(message), err.read_text()
    assert not out.exists() and _leftovers(out_dir) == []


# ------------------------------------------------------------------------------------------ shards cut mid-command
def _cut_after_header(shard: Path) -> None:
    """Truncate ``shard`` to its header: every tensor now lies past the end of the file."""
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    os.truncate(shard, 8 + n)


def _cut_on_first_progress(shard: Path) -> Callable[..., None]:
    """A progress callback that cuts ``shard`` when first called, after the inputs were opened, before data is read."""
    calls: list[float] = []

    def progress(advance: float, total: float | None = None, description: str | None = None, info: str = "") -> None:
        if not calls:
            _cut_after_header(shard)
        calls.append(advance)

    return progress


@pytest.mark.parametrize("command", ["diff", "merge", "prior"])
def test_shard_cut_between_open_and_read(pair, tmp_path, command):
    vl = _copy(pair["vl"], tmp_path / "vl")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    progress = _cut_on_first_progress(vl / SHARD)
    with pytest.raises(CheckpointError) as exc:
        if command == "diff":
            diff(vl, pair["llm"], progress=progress)
        elif command == "merge":
            merge(MergeConfig.simple(str(vl), str(pair["llm"])), out_dir / "m", progress=progress)
        else:
            export_prior(vl, pair["llm"], out_dir / "p.safetensors", progress=progress)
    assert str(exc.value).startswith(f"{vl / SHARD}: file ends"), str(exc.value)
    assert _leftovers(out_dir) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "prior"])
def test_shard_cut_while_the_command_runs(pair, big_pair, tmp_path, command):
    vl = _inflate(pair["vl"], tmp_path / "vl", BIG_FACTOR)  # a fresh sparse copy (copytree would fill the holes)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args, out = _big_command(command, {**big_pair, "vl": vl}, out_dir)
    proc, err = _start(args, out_dir, tmp_path)
    _cut_after_header(vl / SHARD)
    assert _finish(proc) == 1, err.read_text()
    _one_error(err.read_text(), str(vl / SHARD), "file ends")
    assert not out.exists() and _leftovers(out_dir) == []


MAPPED_READ_AFTER_CUT = textwrap.dedent("""
    import os, sys
    from deltakit.errors import CheckpointError
    from deltakit.io.checkpoint import Checkpoint

    shard, key = sys.argv[1:]
    ckpt = Checkpoint.open(shard)
    float(ckpt.get(key).sum())  # map the file while it is whole
    with open(shard, "rb") as f:
        os.truncate(shard, 8 + int.from_bytes(f.read(8), "little"))
    for read in (lambda: ckpt.get(key), lambda: ckpt.rows(key, 0, 1)):
        try:
            float(read().sum())
        except CheckpointError as exc:
            print(exc)
""")


def test_mapped_read_of_a_cut_shard_is_an_error_not_sigbus(pair, tmp_path):
    """``Checkpoint.get``/``rows`` (memory-mapped views) on a shard cut after opening: touching the pages would
    raise SIGBUS and kill the process; each call must raise CheckpointError instead (run apart for that reason)."""
    vl = _copy(pair["vl"], tmp_path / "vl")
    with Checkpoint.open(vl) as ckpt:
        key = next(k for k in ckpt.keys() if "layers.1.mlp.down_proj" in k)
    proc = subprocess.run([sys.executable, "-c", MAPPED_READ_AFTER_CUT, str(vl / SHARD), key], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode} (-7 is SIGBUS)\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{vl / SHARD}: file ends at byte") and key in line for line in lines), lines
