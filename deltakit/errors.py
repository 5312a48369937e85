"""User-facing errors: every problem a user can cause ends in one clear line."""

from __future__ import annotations


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
