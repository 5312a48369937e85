"""User-facing errors: every problem a user can cause ends in one clear line."""

from __future__ import annotations

import os
from pathlib import Path


class DeltakitError(Exception):
    """An error caused by the input (files, flags, configs), shown as one line without a traceback."""


class CheckpointError(DeltakitError):
    """A model folder or safetensors file that cannot be read as asked."""


class FamilyError(DeltakitError):
    """A checkpoint whose keys or config do not fit the model family."""


class IncompatibleError(DeltakitError):
    """Two checkpoints (or a checkpoint and a prior) that cannot be combined."""


class OutputExistsError(DeltakitError):
    """An output path that already exists and was not meant to be replaced."""


class OutputError(DeltakitError):
    """An output that could not be written (disk full, no permission ...); nothing was left under its name.

    ``path`` is the output's final name, ``reason`` what went wrong (``"disk full"`` ...).
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}; nothing was left under this name")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by the CLI so that temporary outputs are removed on the way out.

    A :class:`BaseException` like :class:`KeyboardInterrupt`, so ``except Exception`` does not swallow it.
    """
