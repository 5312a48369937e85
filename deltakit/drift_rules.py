"""The names of the DRIFT rules, importable without torch (configs and the CLI list them; :mod:`deltakit.drift` applies them)."""

from __future__ import annotations

from deltakit.errors import DeltakitError

RULES = ("absolute", "gradnorm", "adaptive")


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`RULES`, else a :class:`DeltakitError`."""
    if rule not in RULES:
        raise DeltakitError(f"unknown DRIFT rule {rule!r}; choose one of: {', '.join(RULES)}")
    return rule
