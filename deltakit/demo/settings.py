"""What the demo compares and with which sizes and hyper-parameters, importable without torch (the CLI's defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from deltakit.drift_rules import check_rule
from deltakit.errors import DeltakitError

MODELS = ("base", "merged", "sft", "drift")
"""The four models the demo compares, in the order of the summary table."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyper-parameters of the demo (the defaults run in under 10 s on 2 idle CPU cores).

    The learning rate is far above the paper's 1e-6 so that tiny models learn something in a few dozen
    steps. At such a rate AdamW turns the prior term, which points the same way every step, into near
    full-size steps, and DRIFT with the paper's ``drift_alpha`` 1 overshoots the reasoner; 0.3 does not
    (docs/demo.md has both runs).
    """

    steps: int = 40
    reasoner_steps: int = 60
    lr: float = 3e-3
    batch_size: int = 4
    n_train: int = 64
    n_bench: int = 20
    max_new_tokens: int = 80
    merge_alpha: float = 0.9
    rule: str = "adaptive"
    drift_alpha: float = 0.3
    hidden: int = 64
    seed: int = 0

    def validated(self) -> "DemoSettings":
        for key in ("steps", "reasoner_steps", "batch_size", "n_bench", "max_new_tokens", "hidden"):
            if getattr(self, key) < 1:
                raise DeltakitError(f"demo: {key.replace('_', '-')} must be at least 1, not {getattr(self, key)}")
        if self.n_train < self.batch_size:
            raise DeltakitError(f"demo: n-train ({self.n_train}) must be at least the batch size ({self.batch_size})")
        if not (self.lr > 0 and self.drift_alpha >= 0 and 0 <= self.merge_alpha <= 1):
            raise DeltakitError(f"demo: need lr > 0, drift-alpha >= 0 and merge alpha in [0, 1] "
                                f"(got {self.lr}, {self.drift_alpha}, {self.merge_alpha})")
        check_rule(self.rule)
        return self
