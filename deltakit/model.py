"""A checkpoint seen through its family: which keys form the text tower, under canonical names."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from deltakit.errors import FamilyError
from deltakit.families import Family, TensorInfo, classify_key, detect_family, get_family, tie_word_embeddings
from deltakit.io.checkpoint import Checkpoint

LM_HEAD = "lm_head.weight"
EMBED = "embed_tokens.weight"


@dataclass
class MappedCheckpoint:
    """A :class:`Checkpoint` plus its family and the role of every key.

    ``text`` maps canonical text-tower names to on-disk keys. When the config ties the output
    embedding and the folder has no ``lm_head``, ``tied`` is true and ``lm_head.weight`` is absent
    from ``text`` (use :meth:`resolve` to read the tied tensor).
    """

    ckpt: Checkpoint
    family: Family
    infos: dict[str, TensorInfo]
    text: dict[str, str] = field(default_factory=dict)
    tied: bool = False

    @property
    def path(self):
        return self.ckpt.path

    @property
    def num_layers(self) -> int:
        layers = [i.layer for i in self.infos.values() if i.layer is not None]
        return max(layers) + 1 if layers else 0

    def keys_with_role(self, role: str) -> list[str]:
        """On-disk keys of one role (``text``, ``vision``, ``projector`` or ``other``)."""
        return [k for k, i in self.infos.items() if i.role == role]

    def resolve(self, canonical: str) -> str:
        """On-disk key holding ``canonical``, following a tied ``lm_head`` to ``embed_tokens``."""
        if canonical == LM_HEAD and self.tied:
            return self.text[EMBED]
        return self.text[canonical]


def text_names(infos: Iterable[TensorInfo], family: Family, where: str) -> dict[str, str]:
    """Canonical text-tower name -> key for classified keys (on-disk keys or in-memory parameter names).

    Two keys mapping to one canonical name is a :class:`FamilyError` naming ``where``.
    """
    text: dict[str, str] = {}
    for info in infos:
        if info.role != "text":
            continue
        if info.canonical in text:
            raise FamilyError(f"{where}: keys {text[info.canonical]!r} and {info.key!r} both map to {info.canonical!r} under family {family.name}")
        text[info.canonical] = info.key
    return text


def map_parameters(model: torch.nn.Module, family: str | Family | None = None) -> tuple[Family, dict[str, TensorInfo], dict[str, str]]:
    """Classify a loaded model's in-memory parameter names (``named_parameters``) like :func:`map_checkpoint` does keys.

    Returns the family (detected from ``model.config`` and the names when None), every parameter's
    :class:`TensorInfo`, and canonical text-tower name -> parameter name. Works on FSDP2-sharded
    models (names are unchanged) but not on wrappers that prefix names (unwrap DDP's ``.module`` first).
    """
    names = [n for n, _ in model.named_parameters()]
    config = model.config.to_dict() if hasattr(model, "config") else {}
    fam = get_family(family) if isinstance(family, str) else family or detect_family(config, names)
    infos = {n: classify_key(n, fam) for n in names}
    return fam, infos, text_names(infos.values(), fam, type(model).__name__)


def map_checkpoint(ckpt: Checkpoint, family: str | Family | None = None) -> MappedCheckpoint:
    """Classify every key of ``ckpt`` under ``family`` (detected from config and keys when None)."""
    fam = get_family(family) if isinstance(family, str) else family or detect_family(ckpt.config, ckpt.keys())
    infos = {k: classify_key(k, fam) for k in ckpt.keys()}
    text = text_names(infos.values(), fam, str(ckpt.path))
    if not any(i.layer is not None for i in infos.values()):
        raise FamilyError(f"{ckpt.path}: no text-tower layer found under family {fam.name} (wrong --family?)")
    tied = LM_HEAD not in text and EMBED in text and (tie_word_embeddings(ckpt.config) or not ckpt.config)
    return MappedCheckpoint(ckpt, fam, infos, text, tied)


def open_model(path: str | os.PathLike, family: str | Family | None = None, allow_pickle: bool = False) -> MappedCheckpoint:
    """Open a checkpoint folder and map it to canonical names (the entry point of every command)."""
    return map_checkpoint(Checkpoint.open(path, allow_pickle=allow_pickle), family)
