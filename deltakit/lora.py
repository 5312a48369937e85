"""LoRA adapters (PEFT) and DRIFT: the prior projected on the adapter factors, and the PEFT specifics around it.

A LoRA layer computes ``W_eff = W + s B A`` (``A`` [r, in], ``B`` [out, r], ``s`` = ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA) with ``W`` frozen. A prior direction ``D`` on ``W`` becomes, by the chain
rule, the gradient of ``<W_eff, D>`` with respect to each factor (:func:`lora_directions`)::

    D_A = s B^T D        D_B = s D A^T

so ``-D_A`` and ``-D_B`` are the factor moves that increase ``<W_eff, D>`` fastest, to first order. They depend
on the current factors and are recomputed every step; ``B`` is zero at initialisation, so ``D_A`` is 0 at the
first step (the rule's coefficient is then 0, as for any zero ``D``). Layers that store ``W`` transposed
(PEFT's ``fan_in_fan_out``, and LoRA on embeddings, ``W_eff = W + s (B A)^T``) use ``D^T`` instead of ``D``.

:func:`lora_layers` and :func:`plain_parameters` let :meth:`deltakit.drift.DriftBias.bind` see a PEFT-wrapped
model under the names the family table knows (``base_model.model.`` and ``.base_layer`` removed, adapter
factors left out); :func:`add_lora`, :func:`save_lora` build and save the adapters of ``deltakit finetune``.
Only plain LoRA on ``nn.Linear``/``nn.Embedding`` layers is supported (not DoRA or other variants, not
adapters already merged, not factors sharded by FSDP2).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from deltakit.errors import DeltakitError, IncompatibleError

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("attn", "mlp")
"""Module groups adapted by default: the text tower's attention and MLP projections (q/k/v/o/gate/up/down), what
``deltakit prior`` covers by default. The default does not depend on the prior, so a plain-LoRA baseline and a
DRIFT run adapt the same modules (and alpha 0 is the baseline bit for bit)."""


def lora_directions(d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                    transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D_A, D_B) = (s B^T D, s D A^T)``, in float32: the gradients of ``<W + s B A, D>`` w.r.t. ``A`` and ``B``.

    ``transposed``: the layer's delta is ``s (B A)^T`` (``fan_in_fan_out``, embeddings), so ``D^T`` is projected.
    """
    d32 = d.to(device=a.device, dtype=torch.float32)
    if transposed:
        d32 = d32.T
    a32, b32 = a.detach().float(), b.detach().float()
    return scaling * (b32.T @ d32), scaling * (d32 @ a32.T)


@dataclass
class LoraTarget:
    """A prior tensor on a frozen weight wrapped by one active LoRA adapter: the factors DRIFT biases instead.

    ``factors`` are the trainable ones among ``("A", a)`` and ``("B", b)``, each with one rule coefficient
    per step from its own projected direction.
    """

    name: str
    module: str
    adapter: str
    alpha: float
    a: torch.nn.Parameter
    b: torch.nn.Parameter
    scaling: float
    transposed: bool
    factors: list[tuple[str, torch.nn.Parameter]]
    prior: torch.Tensor | None = None

    def directions(self, d: torch.Tensor) -> list[torch.Tensor]:
        """The projected direction of each of :attr:`factors`, from the current factor values."""
        da, db = lora_directions(d, self.a, self.b, self.scaling, self.transposed)
        return [da if which == "A" else db for which, _ in self.factors]


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (``PeftModel``, or its ``LoraModel``); ``model`` otherwise."""
    if "peft" not in sys.modules:  # nothing can be wrapped by PEFT before peft is imported
        return model
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model.model if isinstance(model, BaseTuner) else model


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path (in ``model``'s names) -> PEFT LoRA layer, for every LoRA layer in ``model``; empty without peft."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def plain_parameters(model: torch.nn.Module, layers: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """``model``'s parameters under the names they had before the LoRA layers wrapped them.

    ``<path>.base_layer.weight`` becomes ``<path>.weight``; the adapters' own parameters (``lora_A``,
    ``lora_B``, ...) are left out.
    """
    out = {}
    for name, p in model.named_parameters():
        path = name
        owner = None
        while "." in path:
            path = path.rpartition(".")[0]
            if path in layers:
                owner = path
                break
        if owner is None:
            out[name] = p
        elif name.startswith(owner + ".base_layer."):
            out[owner + name[len(owner) + len(".base_layer"):]] = p
    return out


def named_view(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> object:
    """An object :func:`deltakit.model.map_parameters` reads like ``model`` but whose parameters are ``params``."""
    cls = type(type(model).__name__, (), {"named_parameters": lambda self: iter(params.items())})
    view = cls()
    if hasattr(model, "config"):
        view.config = model.config
    return view


def lora_targets_of(name: str, module: str, layer: torch.nn.Module, shape: tuple[int, ...], alpha: float) -> list[LoraTarget]:
    """The LoRA targets of prior tensor ``name`` (of ``shape``) on the frozen weight of ``layer`` (at ``module``).

    Their ``prior`` (D) is left for the caller to load. One per active adapter with a trainable factor;
    empty when there is none (the weight then counts as frozen with no adapter). A merged adapter, DoRA or
    another LoRA variant, a layer that is neither Linear nor Embedding LoRA, or a factor sharded by FSDP2 is
    an :class:`IncompatibleError`.
    """
    if getattr(layer, "disable_adapters", False):
        return []
    out = []
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            transposed = bool(getattr(layer, "fan_in_fan_out", False))
        elif adapter in layer.lora_embedding_A:
            a, b, transposed = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter], True
        else:
            continue
        where = f"LoRA adapter {adapter!r} on the weight of prior tensor {name!r}"
        if adapter in getattr(layer, "merged_adapters", ()):
            raise IncompatibleError(f"{where} is merged into the base weight; unmerge it before training with DRIFT")
        if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter):
            raise IncompatibleError(f"{where} is a LoRA variant (DoRA, ...); DRIFT supports plain LoRA only")
        if isinstance(a, DTensor) or isinstance(b, DTensor):
            raise IncompatibleError(f"{where} is sharded by FSDP2 (DTensor factors); DRIFT on LoRA under FSDP2 is not "
                                    f"supported yet: train LoRA with DDP or a single process")
        want = tuple(shape[::-1]) if transposed else tuple(shape)
        if a.dim() != 2 or b.dim() != 2 or (b.shape[0], a.shape[1]) != want:
            raise IncompatibleError(f"{where}: factors {tuple(b.shape)} x {tuple(a.shape)} do not make a delta of the "
                                    f"prior's shape {tuple(shape)} (LoRA on {type(layer).__name__} layers is not supported)")
        factors = [(which, p) for which, p in (("A", a), ("B", b)) if p.requires_grad]
        if factors:
            out.append(LoraTarget(name, module, adapter, alpha, a, b, float(layer.scaling[adapter]), transposed, factors))
    return out


def target_modules(model: torch.nn.Module, family: str, modules: Sequence[str] | None = None) -> list[str]:
    """Module paths of the text-tower linear layers to adapt, in model order.

    ``modules``: module groups or kinds in the ``--modules`` grammar of ``deltakit prior`` (``attn``, ``mlp``,
    ``attn.q``, ``mlp.down`` ...); :data:`DEFAULT_TARGETS` when None. Only ``nn.Linear`` weights of the text
    tower qualify: never the vision tower or projector; fused MoE experts and embeddings are not adapted.
    """
    from deltakit.engine.selection import Selection
    from deltakit.model import map_parameters

    _, _, text = map_parameters(model, family)
    select = Selection.parse(tuple(modules or DEFAULT_TARGETS))
    keys = {part.key for c, part in text.items() if select(c) and part.expert is None and part.key.endswith(".weight")}
    paths = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and f"{name}.weight" in keys]
    if not paths:
        raise DeltakitError(f"lora_targets {','.join(modules or DEFAULT_TARGETS)} select no linear layer of the text tower "
                            f"to adapt with LoRA (choose module kinds such as attn, mlp, attn.q, mlp.down)")
    return paths


def add_lora(model: torch.nn.Module, family: str, rank: int, alpha: float, modules: Sequence[str] | None = None) -> torch.nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters (``get_peft_model``) on :func:`target_modules`; every base weight frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DeltakitError("LoRA needs peft: pip install peft") from None
    paths = target_modules(model, family, modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths, lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; nothing for the user to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA rank %d, alpha %g (scaling %g) on %d modules: %s trainable parameters of %s, every base weight frozen",
             rank, alpha, alpha / rank, len(paths), f"{trainable:,}", f"{total:,}")
    return peft_model
