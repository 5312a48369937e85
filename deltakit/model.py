"""A checkpoint seen through its family: which keys form the text tower, under canonical names."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

from deltakit.errors import FamilyError
from deltakit.families import (Family, Part, TensorInfo, classify_key, cross_layer_indices, detect_family, get_family,
                               text_parts, tie_word_embeddings)
from deltakit.io.checkpoint import Checkpoint

LM_HEAD = "lm_head.weight"
EMBED = "embed_tokens.weight"


def part_of(tensor: torch.Tensor, part: Part) -> torch.Tensor:
    """The canonical tensor ``part`` of its stored tensor (a view; a transposed part is a strided view)."""
    if part.expert is None:
        return tensor
    m = tensor[part.expert]
    if part.transposed:
        return m[:, part.offset:part.offset + part.shape[0]].t()
    return m[part.offset:part.offset + part.shape[0]]


@dataclass
class MappedCheckpoint:
    """A :class:`Checkpoint` plus its family and the role of every key.

    ``text`` maps canonical text-tower names to :class:`~deltakit.families.Part` s of on-disk tensors (a
    whole key, or an expert's slice of a fused one). When the config ties the output embedding and the
    folder has no ``lm_head``, ``tied`` is true and ``lm_head.weight`` is absent from ``text`` (use
    :meth:`resolve` to read the tied tensor). ``cross`` holds the MLLM-only layer indices (mllama).
    """

    ckpt: Checkpoint
    family: Family
    infos: dict[str, TensorInfo]
    text: dict[str, Part] = field(default_factory=dict)
    tied: bool = False
    cross: frozenset[int] = frozenset()

    @property
    def path(self):
        return self.ckpt.path

    @property
    def num_layers(self) -> int:
        """Paired (canonical) decoder layers: MLLM-only cross-attention layers are not counted."""
        layers = [i.layer for i in self.infos.values() if i.layer is not None]
        return max(layers) + 1 if layers else 0

    def keys_with_role(self, role: str) -> list[str]:
        """On-disk keys of one role (``text``, ``vision``, ``projector`` or ``other``)."""
        return [k for k, i in self.infos.items() if i.role == role]

    def resolve(self, canonical: str) -> Part:
        """Where ``canonical`` is stored, following a tied ``lm_head`` to ``embed_tokens``."""
        if canonical == LM_HEAD and self.tied:
            return self.text[EMBED]
        return self.text[canonical]

    def get(self, canonical: str) -> torch.Tensor:
        """The whole canonical tensor ``canonical`` (a view of the mapped file; copy before changing it)."""
        part = self.resolve(canonical)
        return part_of(self.ckpt.get(part.key), part)

    def parts_of(self, key: str) -> dict[str, Part]:
        """The canonical tensors stored in on-disk tensor ``key`` (several for a fused expert tensor)."""
        return self._by_key.get(key, {})

    @functools.cached_property
    def _by_key(self) -> dict[str, dict[str, Part]]:
        by_key: dict[str, dict[str, Part]] = {}
        for name, part in self.text.items():
            by_key.setdefault(part.key, {})[name] = part
        return by_key


def map_parameters(model: torch.nn.Module, family: str | Family | None = None) -> tuple[Family, dict[str, TensorInfo], dict[str, Part]]:
    """Classify a loaded model's in-memory parameter names (``named_parameters``) like :func:`map_checkpoint` does keys.

    Returns the family (detected from ``model.config`` and the names when None), every parameter's
    :class:`TensorInfo`, and canonical text-tower name -> :class:`Part` of a parameter (fused experts in
    transformers' in-memory layout). Works on FSDP2-sharded models (names are unchanged) but not on
    wrappers that prefix names (unwrap DDP's ``.module`` first).
    """
    params = dict(model.named_parameters())
    config = model.config.to_dict() if hasattr(model, "config") else {}
    fam = get_family(family) if isinstance(family, str) else family or detect_family(config, params)
    cross = cross_layer_indices(fam, config, params)
    infos = {n: classify_key(n, fam, cross) for n in params}
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    return fam, infos, text_parts(infos.values(), shapes, type(model).__name__)


def map_checkpoint(ckpt: Checkpoint, family: str | Family | None = None) -> MappedCheckpoint:
    """Classify every key of ``ckpt`` under ``family`` (detected from config and keys when None)."""
    keys = ckpt.keys()
    fam = get_family(family) if isinstance(family, str) else family or detect_family(ckpt.config, keys)
    cross = cross_layer_indices(fam, ckpt.config, keys)
    infos = {k: classify_key(k, fam, cross) for k in keys}
    shapes = {k: ckpt.meta(k).shape for k, i in infos.items() if i.role == "text"}
    text = text_parts(infos.values(), shapes, str(ckpt.path))
    if not any(i.layer is not None for i in infos.values()):
        raise FamilyError(f"{ckpt.path}: no text-tower layer found under family {fam.name} (wrong --family?)")
    tied = LM_HEAD not in text and EMBED in text and tie_word_embeddings(ckpt.config) is not False
    return MappedCheckpoint(ckpt, fam, infos, text, tied, cross)


def open_model(path: str | os.PathLike, family: str | Family | None = None, allow_pickle: bool = False,
               revision: str | None = None) -> MappedCheckpoint:
    """Open a checkpoint folder, or a hub ID ``org/name[@rev]`` (:func:`deltakit.hub.resolve_model`: an existing
    path wins, then the local cache, then a download), and map it to canonical names (the entry point of every command)."""
    from deltakit.hub import resolve_model

    return map_checkpoint(Checkpoint.open(resolve_model(path, revision, allow_pickle), allow_pickle=allow_pickle), family)
