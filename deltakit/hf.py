"""Loading a model folder with transformers: the class its ``config.json`` names, and its processor.

Never with ``trust_remote_code``: the class must be one transformers ships. A hub ID (``org/name[@rev]``) is
resolved to its cached or downloaded snapshot first (:func:`deltakit.hub.resolve_model`), so transformers
only ever reads a local folder.
"""

from __future__ import annotations

import json
import os
from typing import Any

import transformers

from deltakit.errors import CheckpointError


def model_class(path: str | os.PathLike, revision: str | None = None) -> type:
    """The transformers class named first in ``path/config.json``'s ``architectures``.

    The folder is opened as a :class:`~deltakit.io.checkpoint.Checkpoint` first, so its files are read only
    inside it (or in a Hugging Face cache's blobs), as every other command reads them.
    """
    from deltakit.hub import resolve_model
    from deltakit.io.checkpoint import Checkpoint

    path = resolve_model(path, revision)
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


def load_processor(path: str | os.PathLike, purpose: str, revision: str | None = None) -> Any:
    """``AutoProcessor`` of the folder (or hub ID); a folder without usable processor files is one error line naming ``purpose``."""
    from deltakit.hub import resolve_model

    path = resolve_model(path, revision)
    try:
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load its processor {purpose} ({first}); "
                              "copy the processor and tokenizer files of the original model into it") from None
