"""Shared fixtures: tiny real checkpoints, built once per test session and reused by every test file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from deltakit.tiny import save_tiny


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory) -> None:
    """Fine-tuning data caches go to the session's temporary folder, never to the user's ~/.cache/deltakit."""
    os.environ["DELTAKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_checkpoint(family, seed=0, dtype=torch.float32, max_shard_size=None, **text_kw)`` -> a saved folder.

    The same arguments return the same folder (built on first use); treat it as read-only.
    """
    made: dict[tuple, Path] = {}

    def make(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
             **text_kw) -> Path:
        key = (family, seed, dtype, max_shard_size, tuple(sorted(text_kw.items())))
        if key not in made:
            made[key] = save_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"), seed=seed, dtype=dtype,
                                  max_shard_size=max_shard_size, **text_kw)
        return made[key]

    return make
