"""A checkpoint seen through its family: which keys form the text tower, under canonical names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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


def map_checkpoint(ckpt: Checkpoint, family: str | Family | None = None) -> MappedCheckpoint:
    """Classify every key of ``ckpt`` under ``family`` (detected from config and keys when None)."""
    fam = get_family(family) if isinstance(family, str) else family or detect_family(ckpt.config, ckpt.keys())
    infos = {k: classify_key(k, fam) for k in ckpt.keys()}
    text: dict[str, str] = {}
    for k, info in infos.items():
        if info.role != "text":
            continue
        if info.canonical in text:
            raise FamilyError(f"{ckpt.path}: keys {text[info.canonical]!r} and {k!r} both map to {info.canonical!r} under family {fam.name}")
        text[info.canonical] = k
    if not any(i.layer is not None for i in infos.values()):
        raise FamilyError(f"{ckpt.path}: no text-tower layer found under family {fam.name} (wrong --family?)")
    tied = LM_HEAD not in text and EMBED in text and (tie_word_embeddings(ckpt.config) or not ckpt.config)
    return MappedCheckpoint(ckpt, fam, infos, text, tied)


def open_model(path: str | os.PathLike, family: str | Family | None = None, allow_pickle: bool = False) -> MappedCheckpoint:
    """Open a checkpoint folder and map it to canonical names (the entry point of every command)."""
    return map_checkpoint(Checkpoint.open(path, allow_pickle=allow_pickle), family)
