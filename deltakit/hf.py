"""Loading a model folder with transformers: the class its ``config.json`` names, and its processor.

Never with ``trust_remote_code``: the class must be one transformers ships.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import transformers

from deltakit.errors import CheckpointError


def model_class(path: str | os.PathLike) -> type:
    """The transformers class named first in ``path/config.json``'s ``architectures``.

    The folder is opened as a :class:`~deltakit.io.checkpoint.Checkpoint` first, so its files are read only
    inside it (or in a Hugging Face cache's blobs), as every other command reads them.
    """
    from deltakit.io.checkpoint import Checkpoint

    path = Path(path)
    Checkpoint.open(path).close()
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a model folder (config.json: {exc})") from None
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise CheckpointError(f"{path}: config.json names no transformers architecture ({arch!r})")
    return cls


def load_processor(path: str | os.PathLike, purpose: str) -> Any:
    """``AutoProcessor`` of the folder; a folder without usable processor files is one error line naming ``purpose``."""
    try:
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load its processor {purpose} ({first}); "
                              "copy the processor and tokenizer files of the original model into it") from None
