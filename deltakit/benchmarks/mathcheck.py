"""LaTeX maths for the scorers, bounded in time: math-verify equivalence and the numeric value of an expression.

math-verify (and sympy under it) can take unbounded time on some inputs (``9^{9^{9^{9}}}`` is computed
digit by digit inside one C call, where no ``signal.alarm`` can interrupt it), and its own timeouts use
``signal.alarm``, which works only in the main thread. So the work runs in one helper process
(``python -m deltakit.benchmarks.mathcheck``, started on first use; it shares nothing with a CUDA or
threaded parent), each call with a deadline: past it the process is killed and restarted, and the call
answers "not equal" / "no value", which scores the prediction wrong. A slow parse can neither hang nor crash a scoring run, from any thread.
Plain decimal numbers never leave this process.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from deltakit.errors import DeltakitError

TIMEOUT = 5.0
"""Seconds one call may take (math-verify's own default parsing timeout)."""
_PLAIN = re.compile(r"-?\d+(?:\.\d+)?")


def _numeric(latex: str) -> float | None:
    """In the helper: the real value of a LaTeX expression without free symbols (latex2sympy2_extended, math-verify's
    parser, then sympy's numeric evaluation), or None."""
    from latex2sympy2_extended import latex2sympy

    try:
        expr = latex2sympy(latex)
        if not getattr(expr, "is_number", False):
            return None
        value = complex(expr.evalf(30))
    except Exception:  # noqa: BLE001 - any parse or evaluation failure means "no value", as the official except: does
        return None
    return value.real if value.imag == 0 else None


def _equivalent(gold: str, pred: str, float_rounding: int) -> bool:
    """In the helper: math-verify's ``verify(parse(gold), parse(pred))`` with both wrapped as inline maths."""
    from math_verify import parse, verify

    def wrap(s: str) -> str:
        return s if "$" in s or "\\boxed" in s or "\\(" in s else f"${s}$"

    try:
        return bool(verify(parse(wrap(gold)), parse(wrap(pred)), float_rounding=float_rounding))
    except Exception:  # noqa: BLE001 - math-verify raising means it could not show equivalence
        return False


def _serve() -> None:
    """The helper's loop (``python -m deltakit.benchmarks.mathcheck``): one JSON request a line on stdin, one answer a
    line on stdout."""
    import math_verify  # noqa: F401 - imported before "ready", so start-up time is not charged to the first call
    import latex2sympy2_extended  # noqa: F401

    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the protocol's own stream; anything a library prints goes to stderr
    sys.stdout = sys.stderr
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        op, args = json.loads(line)
        out.write(json.dumps(_numeric(*args) if op == "numeric" else _equivalent(*args)) + "\n")
        out.flush()


STARTUP = 120.0
"""Seconds the helper may take to start (a fresh interpreter importing sympy on a busy machine)."""


class _Helper:
    """The one helper process; calls from several threads are serialised."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.buffer = b""
        self.killed = 0

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the deltakit package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", "deltakit.benchmarks.mathcheck"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        self.buffer = b""
        if self._read(STARTUP) != "ready":
            self.stop()
            raise DeltakitError(f"the math-verify helper ({sys.executable} -m deltakit.benchmarks.mathcheck) did not start; "
                                "is math-verify installed (pip install math-verify)?")

    def _read(self, timeout: float) -> Any:
        """The next answer line, or a ``_NONE`` sentinel past ``timeout`` seconds (or when the helper died)."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return _NONE
            chunk = os.read(fd, 65536)
            if not chunk:
                return _NONE
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def call(self, op: str, args: tuple, timeout: float) -> Any:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            assert self.proc is not None and self.proc.stdin is not None
            try:
                self.proc.stdin.write((json.dumps([op, list(args)]) + "\n").encode())
                self.proc.stdin.flush()
                answer = self._read(timeout)
            except (OSError, ValueError):  # a dead pipe, or a line that is not the protocol's
                answer = _NONE
            if answer is _NONE:  # past its deadline (or dead): killed here, restarted by the next call
                self.stop()
                self.killed += 1
                return None
            return answer

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    f.close()
        self.proc = None


_NONE = object()


_helper = _Helper()
atexit.register(_helper.stop)


@functools.lru_cache(maxsize=8192)  # a gold answer is asked for once per prediction compared with it
def numeric_value(latex: str, timeout: float = TIMEOUT) -> float | None:
    """The real number a LaTeX expression denotes (``\\frac{1}{2}``, ``\\sqrt{2}``, ``2\\pi``), or None when it has
    free symbols, is not real, cannot be parsed, or takes longer than ``timeout`` seconds."""
    if _PLAIN.fullmatch(latex.strip()):
        return float(latex)
    return _helper.call("numeric", (latex,), timeout)


@functools.lru_cache(maxsize=8192)
def equivalent(gold: str, pred: str, float_rounding: int = 6, timeout: float = TIMEOUT) -> bool:
    """Whether math-verify finds ``pred`` equal to ``gold`` (numbers compared at ``float_rounding`` decimals); False
    when it cannot tell within ``timeout`` seconds."""
    if _PLAIN.fullmatch(gold.strip()) and _PLAIN.fullmatch(pred.strip()):
        return round(float(gold), float_rounding) == round(float(pred), float_rounding)
    return bool(_helper.call("equivalent", (gold, pred, float_rounding), timeout))


def timeouts() -> int:
    """How many calls were cut off by their deadline in this process so far."""
    return _helper.killed


if __name__ == "__main__":
    _serve()
