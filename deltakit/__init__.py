"""deltakit: move reasoning skill from a text-only LLM into a multimodal LLM.

Library API (the CLI is a thin layer over it):

- :func:`deltakit.io.Checkpoint.open`, :func:`deltakit.model.open_model`: lazy checkpoint access and
  family mapping to canonical text-tower names.
- :func:`deltakit.diagnostics.diff`: parameter-space compatibility of two checkpoints.
"""

__version__ = "0.1.0"
