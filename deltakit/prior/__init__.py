"""DRIFT reasoning priors: export ``D = theta_LLM - theta_MLLM`` as one self-describing safetensors file, read it back.

- :func:`export_prior` (:mod:`deltakit.prior.export`): the selected text-tower tensors of two
  checkpoints streamed through the engine, D computed in float32 and written under canonical names
  (``layers.0.self_attn.q_proj.weight``) into a file that appears only when complete. The header's
  ``__metadata__`` holds everything needed to trust and reuse the prior: both source folders with the
  sha256 of their ``config.json``, the families, the selection, the dtype, normalization, compression
  and, per tensor, ``|D|`` and ``|W_MLLM|``.
- :mod:`deltakit.prior.encodings`: how D is stored (``full``, ``int8``, ``topk:F``, ``lowrank:R``), one
  entry each.
- :class:`Prior` (:mod:`deltakit.prior.file`): opens such a file, validates it and hands out tensors,
  expanding a compressed one transparently; it is what :class:`deltakit.drift.DriftBias` binds.

Format and trade-offs: ``docs/prior.md``.
"""

from deltakit.engine.selection import PRIOR_MODULES
from deltakit.prior.encodings import ENCODINGS, Compression, Encoding, PriorError
from deltakit.prior.export import DEFAULT_MODULES, PriorReport, export_prior, plan_prior
from deltakit.prior.file import FORMAT, FORMAT_VERSION, Prior, per_module

__all__ = ["DEFAULT_MODULES", "ENCODINGS", "FORMAT", "FORMAT_VERSION", "PRIOR_MODULES",
           "Compression", "Encoding", "Prior", "PriorError", "PriorReport", "export_prior", "per_module", "plan_prior"]
