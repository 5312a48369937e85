"""DRIFT inside the trainers people already use.

- :class:`DriftCallback`: a ``transformers.TrainerCallback`` for ``Trainer`` and TRL's ``SFTTrainer``
  (one process, or under accelerate with DDP or FSDP2).

Importing this package imports nothing heavy; the callback's module imports transformers when used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DriftCallback"]


def __getattr__(name: str) -> Any:
    if name == "DriftCallback":
        from deltakit.integrations.transformers import DriftCallback

        return DriftCallback
    raise AttributeError(f"module 'deltakit.integrations' has no attribute {name!r}")
