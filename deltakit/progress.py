"""How library code reports progress without knowing who watches (a rich bar, a log, nobody).

A progress callback is called once as ``progress(0, total=N, description="...")`` when a phase starts,
then ``progress(n)`` for every ``n`` units done, optionally with a short status ``info`` (e.g. the current loss). :func:`no_progress` ignores everything.
"""

from __future__ import annotations

from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, advance: float, total: float | None = None, description: str | None = None, info: str = "") -> None: ...


def no_progress(advance: float, total: float | None = None, description: str | None = None, info: str = "") -> None:
    """A progress callback that does nothing."""
