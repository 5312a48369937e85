"""deltakit: move reasoning skill from a text-only LLM into a multimodal LLM.

The calls a user needs, each the Python form of one command (``docs/api.md``)::

    import deltakit
    report = deltakit.diff("models/Qwen2.5-VL-7B-Instruct", "models/DeepSeek-R1-Distill-Qwen-7B")
    deltakit.merge("commands/merge-br2v-qwen2.5-vl-7b-r1.yaml", "out/br2v")
    deltakit.export_prior("models/Qwen2.5-VL-7B-Instruct", "models/DeepSeek-R1-Distill-Qwen-7B", "prior.safetensors")
    bias = deltakit.DriftBias.bind(model, deltakit.Prior.open("prior.safetensors"), rule="adaptive", alpha=1.0)
    trainer = Trainer(..., callbacks=[deltakit.DriftCallback("prior.safetensors")])
    deltakit.finetune(deltakit.TrainConfig.from_yaml("commands/finetune-drift-qwen2.5-vl-7b.yaml"))
    deltakit.evaluate("out/drift", "bench.jsonl")
    deltakit.score("MathVista/testmini.parquet", "predictions.jsonl")

Importing ``deltakit`` imports neither torch nor transformers: each name loads its module when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {  # name -> the module defining it; merge and evaluate are modules that are also their function
    "diff": "deltakit.diagnostics",
    "merge": None,
    "MergeConfig": "deltakit.merge",
    "export_prior": "deltakit.prior",
    "Prior": "deltakit.prior",
    "DriftBias": "deltakit.drift",
    "DriftCallback": "deltakit.integrations",
    "finetune": "deltakit.train",
    "TrainConfig": "deltakit.train",
    "evaluate": None,
    "score": "deltakit.benchmarks",
    "open_model": "deltakit.model",
}
__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        where = _WHERE[name]
        value = importlib.import_module(f"deltakit.{name}") if where is None else getattr(importlib.import_module(where), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deltakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
