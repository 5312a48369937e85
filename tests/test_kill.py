"""SIGKILL mid-run: no output ever looks complete unless it is, and the next run with the same OUT recovers.

A killed process cannot clean up. What must hold anyway: the final name (a merged folder, a prior file, a
fine-tuned folder) exists only when complete; the temporary ``.OUT.xxxxxxxx.tmp`` it leaves is removed by
the next run with the same OUT, which says so in a log line; and ``finetune --resume`` continues from the
newest complete checkpoint, ending with the weights of an uninterrupted run.

The commands run in child processes forked from a fork server (``multiprocessing`` "forkserver") that has
imported deltakit, torch and transformers once, so a kill costs no import time: each child calls the CLI
entry point ``deltakit.cli.main`` as the ``deltakit`` console script does, with its output in a log file.
One test kills a fresh ``python -m deltakit`` interpreter instead (``-m deltakit.cli`` cannot run: the
package has no ``__main__``). Kills are placed by what the child has written (polled in its temporary output), at fractions drawn from
seeded generators, so they land inside the write phase whatever the machine's load.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltakit.io.checkpoint import Checkpoint
from deltakit.io.format import build_header
from deltakit.io.writer import SafetensorsWriter, TensorSpec, atomic_output_dir, remove_stale
from deltakit.model import open_model
from deltakit.tiny import save_partner_llm, save_tiny

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds a child may take to reach its kill point
FACTOR = 24  # text-layer tensors of the tiny pair grown 24x per dimension: ~42 MB per model, sparse on disk
PRELOAD = ["deltakit.cli", "deltakit.cli.merge", "deltakit.cli.prior", "deltakit.cli.finetune", "deltakit.merge",
           "deltakit.prior", "deltakit.train", "deltakit.data", "deltakit.hf",
           "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "transformers.models.qwen2_5_vl.processing_qwen2_5_vl",
           "transformers.models.qwen2_vl.image_processing_qwen2_vl"]


def _child(argv: list[str], log: str) -> None:
    """In the child: stdout and stderr to ``log``, then the CLI exactly as the console script runs it."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from deltakit.cli import main

    main(argv)


@pytest.fixture(scope="module")
def spawn():
    """``spawn(argv, log)`` -> a started child process running ``deltakit ARGV``."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    started: list = []

    def start(argv: list[str], log: Path):
        proc = ctx.Process(target=_child, args=(argv, str(log)), daemon=True)
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


def _kill_when(proc, ready, log: Path) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` is true; False if it exited (successfully) before that."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if not proc.is_alive():
            proc.join()
            assert proc.exitcode == 0, f"exit {proc.exitcode} before its kill point:\n{log.read_text()}"
            return False
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"kill point not reached in {TIMEOUT} s:\n{log.read_text()}")
        time.sleep(0.001)
    proc.kill()
    proc.join()
    if proc.exitcode == 0:  # finished between the last poll and the signal
        return False
    assert proc.exitcode == -9, log.read_text()
    return True


def _temporaries(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


def _fraction_written(parent: Path, name: str) -> float:
    """Bytes of data written into the temporary output(s) of ``name`` over their planned size (-1 before any).

    The writers lay files out at full size (sparse) before writing, so allocated blocks count what was written.
    """
    try:
        files = [f for t in _temporaries(parent, name) for f in ([t] if t.is_file() else t.iterdir())]
        planned = sum(f.stat().st_size for f in files)
        return sum(f.stat().st_blocks * 512 for f in files) / planned if planned else -1.0
    except FileNotFoundError:  # renamed or removed meanwhile
        return -1.0


def _fractions(seed: int, n: int) -> list[float]:
    """``n`` seeded kill points in [0, 1) of the written bytes, sorted (the first as soon as anything is written)."""
    rng = random.Random(seed)
    return sorted([0.0] + [rng.uniform(0.02, 0.98) for _ in range(n - 1)])


def _inflate(src: Path, dst: Path, factor: int) -> Path:
    """A copy of checkpoint ``src`` whose text-layer tensors are ``factor`` times larger per dimension (zeros, sparse)."""
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
    with open(dst / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(torch.Size(s).numel() * d.itemsize for _, d, s in specs))
    return dst


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2.5-VL and its partner LLM with large (sparse, zero) text layers (read-only)."""
    root = tmp_path_factory.mktemp("kill-pair")
    vl = save_tiny("qwen2_5_vl", root / "small-vl")
    llm = save_partner_llm(vl, root / "small-llm")
    return {"vl": _inflate(vl, root / "vl", FACTOR), "llm": _inflate(llm, root / "llm", FACTOR)}


def _cli_ok(argv: list[str]) -> None:
    """The CLI in this process; it must succeed."""
    from deltakit.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), exc


def _rerun(argv: list[str], caplog) -> None:
    with caplog.at_level(logging.INFO):
        _cli_ok(argv)


def _removal_logged(caplog, stale: list[Path]) -> None:
    for s in stale:
        assert any(r.levelno == logging.WARNING and "removed" in r.getMessage() and str(s) in r.getMessage()
                   for r in caplog.records), (s, caplog.messages)


def _merge_complete(out: Path, vl: Path) -> None:
    with Checkpoint.open(out) as got, Checkpoint.open(vl) as want:
        assert got.keys() == want.keys()
    assert json.loads((out / "merge_report.json").read_text())["method"] == "linear"


def _prior_complete(out: Path) -> None:
    from deltakit.prior import Prior

    prior = Prior.open(out)
    try:
        assert prior.names and all(prior.get(n).abs().sum() == 0 for n in prior.names[:2])  # zeros minus zeros
    finally:
        prior.close()


# ---------------------------------------------------------------------------------- stale temporary outputs
def test_remove_stale_takes_only_what_no_live_writer_holds(tmp_path, caplog):
    out = tmp_path / "out"
    dead = tmp_path / ".out.deadbeef.tmp"  # what a killed run leaves: nobody holds its lock
    (dead / "sub").mkdir(parents=True)
    (tmp_path / ".out.0badf00d.old").mkdir()
    (tmp_path / ".out.12345678.tmp.bak").mkdir()  # not our naming scheme
    (tmp_path / ".out.cafecafe.tmp").symlink_to(tmp_path / "elsewhere")  # a link under our naming scheme: not ours
    with caplog.at_level(logging.INFO), atomic_output_dir(out) as live:
        assert not dead.exists() and not (tmp_path / ".out.0badf00d.old").exists()
        _removal_logged(caplog, [dead, tmp_path / ".out.0badf00d.old"])
        assert remove_stale(out) == [] and live.is_dir()  # a run in progress keeps its folder
        file_out = tmp_path / "p.safetensors"
        writer = SafetensorsWriter(file_out, [TensorSpec("t", torch.float32, (2,))])
        assert remove_stale(file_out) == [] and len(_temporaries(tmp_path, file_out.name)) == 1
        writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.12345678.tmp.bak", ".out.cafecafe.tmp", "out"]


@pytest.mark.slow
def test_sigkill_of_the_console_command_mid_write(big_pair, tmp_path, caplog):
    """The same through ``python -m deltakit`` (what the ``deltakit`` script runs), in a fresh interpreter.

    ``python -m deltakit.cli`` does not work (a package without ``__main__``)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "p.safetensors"
    argv = ["prior", "--mllm", str(big_pair["vl"]), "--llm", str(big_pair["llm"]), str(out)]
    fraction = random.Random(5).uniform(0.05, 0.9)
    log = tmp_path / "child.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "deltakit", *argv, "--threads", "1"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=f)
    try:
        deadline = time.monotonic() + TIMEOUT
        while _fraction_written(out_dir, out.name) < fraction:
            assert proc.poll() is None, f"exit {proc.returncode} before its kill point:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"kill point not reached in {TIMEOUT} s"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    stale = _temporaries(out_dir, out.name)
    assert not out.exists() and len(stale) == 1
    _rerun(argv, caplog)
    _prior_complete(out)
    _removal_logged(caplog, stale)
    assert sorted(p.name for p in out_dir.iterdir()) == [out.name]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "prior"])
def test_sigkill_mid_write_leaves_no_complete_looking_output_and_the_rerun_recovers(big_pair, tmp_path, spawn, caplog,
                                                                                     command):
    name = "merged" if command == "merge" else "p.safetensors"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / name
    argv = [command, "--mllm", str(big_pair["vl"]), "--llm", str(big_pair["llm"]), str(out), "--threads", "1"]
    complete = (lambda: _merge_complete(out, big_pair["vl"])) if command == "merge" else (lambda: _prior_complete(out))
    landed = []
    for i, fraction in enumerate(_fractions(seed=7 if command == "merge" else 8, n=3)):
        log = tmp_path / f"child-{i}.log"
        proc = spawn(argv, log)
        killed = _kill_when(proc, lambda: _fraction_written(out_dir, name) >= fraction, log)
        stale = _temporaries(out_dir, name)
        if killed and not out.exists():
            landed.append(fraction)
            assert stale, "killed mid-write, but no temporary output was left (was it written elsewhere?)"
        else:  # finished before the signal: then the output must be whole
            complete()
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        caplog.clear()
        _rerun(argv[:-2] + ["--threads", "2"], caplog)  # same OUT, no --force
        complete()
        _removal_logged(caplog, stale)
        assert sorted(p.name for p in out_dir.iterdir()) == [name]  # the stale temporary output is gone
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    assert len(landed) >= 2, f"only the kills at {landed} of the written bytes landed inside the write phase"


# ---------------------------------------------------------------------------------------------------- finetune
STEPS, SAVE_EVERY = 5, 2  # checkpoints at steps 2 and 4; the last step ends in the final save


@pytest.fixture(scope="module")
def ft(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2.5-VL (2.2M parameters: checkpoints of 27 MB, so a kill can land inside one) with its processor,
    the demo's synthetic data, a YAML config, and the weights of an uninterrupted run of it."""
    from deltakit.demo.samples import write_demo_data
    from deltakit.tiny_processor import save_tiny_processor

    root = tmp_path_factory.mktemp("kill-ft")
    model = save_tiny("qwen2_5_vl", root / "mllm", hidden=256, intermediate=1024)
    save_tiny_processor(model, "qwen2_5_vl")
    data = write_demo_data(root / "data", n=8, n_bench=1)
    config = root / "finetune.yaml"
    config.write_text(f"model: {model}\ndata: {data.train}\nmax_steps: {STEPS}\nbatch_size: 2\nlr: 1.0e-3\n"
                      f"warmup_ratio: 0.2\nsave_every: {SAVE_EVERY}\nprecision: fp32\nseed: 3\n")
    _cli_ok(["finetune", "--config", str(config), "--out", str(root / "uninterrupted")])
    return {"root": root, "config": config, "reference": root / "uninterrupted"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _step_file(ckpts: Path, step: int) -> Path:
    return ckpts / f"step-{step:07d}.tmp" / "__0_0.distcp"


@pytest.mark.slow
@pytest.mark.parametrize("where, seed", [("checkpoint", 11), ("final-save", 13)])
def test_finetune_resume_after_sigkill_gives_the_uninterrupted_weights(ft, tmp_path, spawn, caplog, where, seed):
    out = tmp_path / "run"
    ckpts = tmp_path / "run.run" / "checkpoints"
    argv = ["finetune", "--config", str(ft["config"]), "--out", str(out)]
    log = tmp_path / "child.log"
    proc = spawn(argv, log)
    if where == "checkpoint":  # inside the write of the step-4 checkpoint, a seeded fraction of its bytes in
        fraction = random.Random(seed).uniform(0.0, 0.9)

        def ready() -> bool:
            done, part = ckpts / f"step-{SAVE_EVERY:07d}" / "__0_0.distcp", _step_file(ckpts, 2 * SAVE_EVERY)
            try:
                return done.exists() and part.stat().st_size >= fraction * done.stat().st_size
            except FileNotFoundError:
                return False
        resume_from = SAVE_EVERY
    else:  # inside the final save, once its temporary folder is there
        def ready() -> bool:
            return bool(_temporaries(tmp_path, out.name))
        resume_from = 2 * SAVE_EVERY
    killed = _kill_when(proc, ready, log)
    assert killed, f"the run finished before its kill point ({where}):\n{log.read_text()}"
    assert not out.exists()
    stale = [ckpts / f"step-{2 * SAVE_EVERY:07d}.tmp"] if where == "checkpoint" else _temporaries(tmp_path, out.name)
    assert all(p.exists() for p in stale) and stale
    assert [p.name for p in sorted(ckpts.iterdir()) if not p.name.endswith(".tmp")] == \
        [f"step-{s:07d}" for s in range(SAVE_EVERY, resume_from + 1, SAVE_EVERY)]

    caplog.clear()
    _rerun(argv + ["--resume", "--json", str(tmp_path / "result.json")], caplog)
    _removal_logged(caplog, stale)
    assert not any(p.exists() for p in stale)
    assert json.loads((tmp_path / "result.json").read_text())["resumed_from"] == resume_from
    want, got = _weights(ft["reference"]), _weights(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".run", "run"))) == ["run", "run.run"]
