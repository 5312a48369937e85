"""Resumable training checkpoints: trainable weights, optimizer, step (= schedule and data position), RNG.

Weights and optimizer state go through ``torch.distributed.checkpoint`` (each process writes its own
shards under FSDP2; a checkpoint can be loaded at another world size). Frozen parameters are not saved:
they are reloaded from the base model. The learning rate and the data order are pure functions of the
step and seed, so the step is all the schedule and sampler state there is. A checkpoint is written into
``step-NNNNNNN.tmp`` (files fsynced) and renamed when complete; only the newest ``keep`` are kept, an old one
renamed to ``step-NNNNNNN.deleting`` before it is removed. So a process killed at any point (SIGKILL,
preemption) leaves every ``step-NNNNNNN`` complete; :func:`remove_incomplete` clears what it was writing or
deleting when the next run starts, and ``--resume`` continues from the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from deltakit.train.dist import DistEnv

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_COMPLETE = re.compile(r"step-\d+")
_INCOMPLETE = re.compile(r"step-\d+\.(tmp|deleting)")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Frozen parameters are absent from the checkpoint by design; dcp.load already fails on any missing trainable one.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's notice that it runs without a process group (expected for a single-process run)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(folder: Path) -> None:
    """Remove a checkpoint so that no half-deleted one is ever left under its ``step-NNNNNNN`` name."""
    doomed = folder.with_name(folder.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    env: DistEnv, keep: int) -> Path:
    """Write checkpoint ``folder`` (all processes call this) and prune older ones beyond ``keep``.

    Everything goes into ``folder.tmp`` and is fsynced; the rename to ``folder`` is the last step, so a
    process killed on the way leaves only the ``.tmp`` (removed by :func:`remove_incomplete`) and the older
    checkpoints, all complete.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rng-{env.rank}.pt")
    _fsync(tmp / f"rng-{env.rank}.pt")
    env.barrier()
    if env.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        _fsync(tmp / STATE_FILE)
        _fsync(tmp)
        if folder.exists():
            _discard(folder)
        tmp.rename(folder)
        _fsync(folder.parent)
        for old in list_checkpoints(folder.parent)[:-keep]:
            _discard(old)
    env.barrier()
    return folder


def remove_incomplete(run_checkpoints: Path) -> list[Path]:
    """Remove what a killed run was writing (``step-N.tmp``) or deleting (``step-N.deleting``); returns them.

    Call it on the main process only, before the run's first checkpoint; each removal is logged.
    """
    if not run_checkpoints.is_dir():
        return []
    removed = sorted(p for p in run_checkpoints.iterdir() if _INCOMPLETE.fullmatch(p.name) and p.is_dir())
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
        what = "an unfinished checkpoint" if p.name.endswith(".tmp") else "a checkpoint half deleted"
        log.warning("removed %s: %s of an interrupted run", p, what)
    return removed


def list_checkpoints(run_checkpoints: Path) -> list[Path]:
    """Complete checkpoints in a folder, oldest first."""
    if not run_checkpoints.is_dir():
        return []
    return sorted(p for p in run_checkpoints.glob("step-*")
                  if _COMPLETE.fullmatch(p.name) and p.is_dir() and (p / STATE_FILE).exists())


def read_state(folder: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint."""
    return json.loads((folder / STATE_FILE).read_text())


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """Restore weights, optimizer and this process's RNG from ``folder``; returns its trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_LOAD_OPTIONS)
    state = read_state(folder)
    saved_by = len(list(folder.glob("rng-*.pt")))
    if saved_by == env.world_size:
        rng = torch.load(folder / f"rng-{env.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        # N processes' RNG streams cannot continue on M: re-seed each process from the seed, the step and its
        # rank. The data order and the learning rate are functions of the step, so only randomness inside
        # the forward pass (dropout, none in most checkpoints) differs from an uninterrupted run.
        torch.manual_seed(int(state.get("fingerprint", {}).get("seed", 0)) + 1_000_003 * int(state["step"]) + env.rank)
        if env.is_main:
            log.warning("resuming a checkpoint of %d processes on %d: RNG streams re-seeded from seed, step and rank "
                        "(in-model randomness such as dropout differs from an uninterrupted run; the rest does not)",
                        saved_by, env.world_size)
    return state
