"""Hugging Face model IDs: ``org/name``, ``org/name@REV`` or ``org/name`` with ``revision=`` -> a local folder.

An existing local path always wins. Otherwise the ID is looked up in huggingface_hub's cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; read when called, so a
changed environment counts): ``models--ORG--NAME/refs/REV`` names the snapshot, and a snapshot that holds
``config.json`` and every weight file it needs is used as it is, with no network. A model that is not
cached (or is incomplete) is downloaded with :func:`huggingface_hub.snapshot_download` (its progress bar)
unless ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, in which case it is one clear error line.
Only safetensors weights, JSON configs and tokenizer, processor and chat-template files are fetched;
``.bin`` weights only with ``allow_pickle`` (they are then loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from deltakit.errors import CheckpointError

# What a model download fetches (fnmatch patterns on repo paths, as huggingface_hub's allow_patterns).
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt", "spiece.model",
                  "*.model"]
PICKLE_PATTERNS = ["*.bin"]
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_TRUE = {"1", "on", "yes", "true"}


class HubError(CheckpointError):
    """A model ID that cannot be resolved to a folder (not cached while offline, unknown repo, failed download)."""


def parse_model_id(name: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` of ``org/name`` or ``org/name@rev``; None when ``name`` is not shaped like an ID."""
    m = _ID.match(name)
    if m is None or ".." in m.group("repo") or name.startswith(("./", "../", "/")):
        return None
    return m.group("repo"), m.group("rev")


def hub_cache() -> Path:
    """The hub cache folder huggingface_hub uses, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def cached_snapshot(repo_id: str, revision: str | None = None, cache: Path | None = None,
                    allow_pickle: bool = False) -> Path | None:
    """The complete cached snapshot of ``repo_id`` at ``revision`` (default ``main``), or None.

    Complete: ``config.json`` and weights are there (every shard a ``*.index.json`` lists), as symlinks that
    resolve (a half-finished download leaves none or broken ones)."""
    repo = (cache or hub_cache()) / f"models--{repo_id.replace('/', '--')}"
    rev = revision or "main"
    commit = rev if re.fullmatch(r"[0-9a-f]{40}", rev) else None
    if commit is None:
        ref = repo / "refs" / rev
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snap = repo / "snapshots" / commit
    return snap if _complete(snap, allow_pickle) else None


def _complete(snap: Path, allow_pickle: bool) -> bool:
    if not (snap / "config.json").is_file():
        return False
    for ext in ("safetensors", "bin") if allow_pickle else ("safetensors",):
        for index in snap.glob(f"*.{ext}.index.json"):
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False
            return all((snap / s).is_file() for s in shards)
        if any(p.is_file() for p in snap.glob(f"*.{ext}")):
            return True
    return False


def resolve_model(name: str | os.PathLike, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local folder for ``name``: the path itself when it exists (or is not shaped like a hub ID), else the
    cached or downloaded snapshot of the hub ID (see the module docstring). ``revision`` overrides
    ``@rev``; giving both differently is an error."""
    path = Path(name)
    if path.exists():
        if revision is not None:
            raise HubError(f"{name}: --revision applies to hub model IDs, but this is a local path")
        return path
    parsed = parse_model_id(str(name))
    if parsed is None:
        return path  # not an ID: the caller reports the missing path as it always has
    repo_id, at = parsed
    if revision is not None and at is not None and revision != at:
        raise HubError(f"{name}: revision {at!r} in the ID and --revision {revision!r} disagree")
    rev = revision or at
    cache = hub_cache()
    snap = cached_snapshot(repo_id, rev, cache, allow_pickle)
    if snap is not None:
        return snap
    where = f"{repo_id}@{rev}" if rev else repo_id
    if offline():
        raise HubError(f"{where}: not a local path and not (completely) in the Hugging Face cache {cache}, and "
                       "HF_HUB_OFFLINE is set; download it first or give the model's folder")
    return _download(repo_id, rev, cache, allow_pickle, where)


def _download(repo_id: str, revision: str | None, cache: Path, allow_pickle: bool, where: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise HubError(f"{where}: not a local path, and no such model on the Hugging Face hub "
                       "(or it is gated/private: log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: not a local path, and the hub model has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HubError(f"{where}: not a local path, and its download failed ({first})") from None
    if not _complete(folder, allow_pickle):
        hint = "" if allow_pickle else " (a .bin-only model needs --allow-pickle)"
        raise HubError(f"{where}: the download has no config.json and safetensors weights{hint}")
    return folder
