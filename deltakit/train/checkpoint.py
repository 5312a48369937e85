"""Resumable training checkpoints: trainable weights, optimizer, step (= schedule and data position), RNG.

Weights and optimizer state go through ``torch.distributed.checkpoint`` (each process writes its own
shards under FSDP2; a checkpoint can be loaded at another world size). Frozen parameters are not saved:
they are reloaded from the base model. The learning rate and the data order are pure functions of the
step and seed, so the step is all the schedule and sampler state there is. A checkpoint is written into
``step-NNNNNNN.tmp`` and renamed when complete; only the newest ``keep`` are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from deltakit.errors import DeltakitError
from deltakit.train.dist import DistEnv

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
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


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    env: DistEnv, keep: int) -> Path:
    """Write checkpoint ``folder`` (all processes call this) and prune older ones beyond ``keep``."""
    tmp = folder.with_name(folder.name + ".tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rng-{env.rank}.pt")
    env.barrier()
    if env.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        for old in list_checkpoints(folder.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    env.barrier()
    return folder


def list_checkpoints(run_checkpoints: Path) -> list[Path]:
    """Complete checkpoints in a folder, oldest first."""
    if not run_checkpoints.is_dir():
        return []
    return sorted(p for p in run_checkpoints.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).exists())


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
    rng_file = folder / f"rng-{env.rank}.pt"
    if not rng_file.exists():
        raise DeltakitError(f"{folder}: no RNG state for rank {env.rank} (saved with fewer processes?)")
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return read_state(folder)
