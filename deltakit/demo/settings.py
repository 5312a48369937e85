"""The miniature's recipe, the study's methods and hyper-parameters, the demo's settings; importable without torch.

Every number here was fixed before any study result was seen; ``docs/study.md`` gives the reason for each.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from deltakit.drift_rules import check_rule
from deltakit.errors import DeltakitError


@dataclass(frozen=True)
class FamilyRecipe:
    """How :func:`deltakit.demo.family.build_family` builds the family (a change of any field is a new cache entry)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vision_hidden: int = 64
    vision_heads: int = 4
    vision_depth: int = 2
    batch: int = 32
    """Batch of the MLLMs' training."""
    lr: float = 1e-3
    """Peak learning rate of both MLLMs' vision encoder and merger (and the far tower) after the alignment."""
    align_lr: float = 2e-3
    align_steps: int = 600
    """Stage 1 of each MLLM: the vision encoder and merger aligned to the digit embeddings (the same for both)."""
    base_lr: float = 1e-3
    base_batch: int = 64
    reasoner_lr: float = 1e-3
    reasoner_batch: int = 16
    base_steps: int = 600
    reasoner_steps: int = 1200
    close_steps: int = 400
    far_steps: int = 400
    close_tower_lr: float = 0.25
    """The close MLLM's language tower learns at this fraction of ``lr`` (lightly tuned, as LLaVA's)."""
    n_check: int = 200
    """Held-out text questions the base and the reasoner are scored on (``family.json``)."""
    max_new_tokens: int = 64
    """Generation budget of the checks: a full chain of thought is 51 tokens with the family's tokenizer."""
    seed: int = 0


METHODS = ("base", "linear", "task_arithmetic", "ties", "dare_ties", "layer_swap",
           "sft", "drift_absolute", "drift_gradnorm", "drift_adaptive", "drift_adaptive_attn", "drift_adaptive_mlp")
"""The study's rows (the paper's Tables 1, 2 and 4): the MLLM, five merges, SFT, DRIFT per rule (attention and
MLP prior), and DRIFT adaptive with an attention-only and an MLP-only prior."""
MERGES = ("linear", "task_arithmetic", "ties", "dare_ties", "layer_swap")
LABELS = {"base": "MLLM (no transfer)", "linear": "BR2V linear (0.9)", "task_arithmetic": "task arithmetic",
          "ties": "TIES", "dare_ties": "DARE-TIES", "layer_swap": "layer swap", "sft": "SFT",
          "drift_absolute": "DRIFT absolute", "drift_gradnorm": "DRIFT gradnorm", "drift_adaptive": "DRIFT adaptive",
          "drift_adaptive_attn": "DRIFT adaptive, attn prior", "drift_adaptive_mlp": "DRIFT adaptive, MLP prior"}
SEEDED = ("dare_ties", "sft", "drift_absolute", "drift_gradnorm", "drift_adaptive", "drift_adaptive_attn", "drift_adaptive_mlp")
"""Methods whose result depends on the seed (DARE's drop, the fine-tuning's data order); the others are run once."""


@dataclass(frozen=True)
class StudySettings:
    """One configuration of the study (:func:`deltakit.demo.study.run_config`): data sizes and every method's parameters."""

    n_train: int = 256
    n_test: int = 500
    n_heldout: int = 100
    steps: int = 48
    """SFT and DRIFT optimizer steps: 3 epochs of ``n_train`` at ``batch_size`` (the paper's 3 epochs)."""
    batch_size: int = 16
    lr: float = 5e-4
    warmup_ratio: float = 0.05
    drift_alpha: float = 1.0
    merge_alpha: float = 0.9
    density: float = 0.2
    keep_layers: int = 1
    max_new_tokens: int = 64
    """Generation budget of eval: a full chain of thought is 51 tokens (digits are one token each, spaces another)."""
    eval_batch: int = 250
    methods: tuple[str, ...] = METHODS

    def validated(self) -> StudySettings:
        for key in ("n_train", "n_test", "n_heldout", "steps", "batch_size", "max_new_tokens", "eval_batch"):
            if getattr(self, key) < 1:
                raise DeltakitError(f"demo: {key.replace('_', '-')} must be at least 1, not {getattr(self, key)}")
        if self.n_train < self.batch_size:
            raise DeltakitError(f"demo: n-train ({self.n_train}) must be at least the batch size ({self.batch_size})")
        if not (self.lr > 0 and self.drift_alpha >= 0 and 0 <= self.merge_alpha <= 1 and 0 < self.density <= 1):
            raise DeltakitError(f"demo: need lr > 0, drift-alpha >= 0, merge alpha in [0, 1] and density in (0, 1] "
                                f"(got {self.lr}, {self.drift_alpha}, {self.merge_alpha}, {self.density})")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise DeltakitError(f"demo: unknown method {unknown[0] if unknown else '(none given)'}; known: {', '.join(METHODS)}")
        for m in self.methods:
            if m.startswith("drift_"):
                check_rule(m.split("_")[1])
        return self


QUICK = dict(n_test=100, n_heldout=40, steps=16, n_train=128)
"""What ``--quick`` changes: a 100-question test (accuracy to about +-9 points), a third of the fine-tuning."""


@dataclass(frozen=True)
class DemoSettings:
    """What ``deltakit demo`` runs: the family recipe, one study configuration, its seed."""

    study: StudySettings = field(default_factory=StudySettings)
    recipe: FamilyRecipe = field(default_factory=FamilyRecipe)
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> DemoSettings:
        return cls(study=replace(StudySettings(), **QUICK), **kw)

    def validated(self) -> DemoSettings:
        self.study.validated()
        return self
