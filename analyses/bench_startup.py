"""Benchmark: whole-process wall time of `deltakit --help` and `deltakit <command> --help`, beside `import torch`.

Each variant is a fresh process started from this interpreter's own ``bin`` folder (the ``deltakit``
console script that ``pip install -e .`` wrote, no version-manager shim in front); the wall time runs
from spawn to exit with output discarded. ``python3 -c pass`` (the interpreter alone) and
``python3 -c "import torch"`` are measured beside them for reference. Rounds are interleaved (each runs
every variant once) after one untimed warm-up round; best and median per variant, and the 1-minute
load average before and after (the machine may be shared). Prints a markdown table and writes
docs/benchmarks/startup.json. Run it under the shared lock:

    flock /tmp/deltakit-bench.lock python3 analyses/bench_startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltakit.cli import COMMANDS  # noqa: E402

BIN = Path(sys.executable).parent


def variants() -> dict[str, list[str]]:
    """Label -> argv of every measured process, in table order."""
    deltakit = str(BIN / "deltakit")
    out = {"deltakit --help": [deltakit, "--help"]}
    out.update({f"deltakit {name} --help": [deltakit, name, "--help"] for name in COMMANDS})
    out["python3 -c pass"] = [sys.executable, "-c", "pass"]
    out['python3 -c "import torch"'] = [sys.executable, "-c", "import torch"]
    return out


def wall_time(argv: list[str]) -> float:
    """Seconds from spawning ``argv`` to its exit (which must be 0)."""
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="Timed rounds (each runs every variant once).")
    args = parser.parse_args()
    todo = variants()
    load_before = os.getloadavg()[0]
    for argv in todo.values():
        wall_time(argv)
    times: dict[str, list[float]] = {label: [] for label in todo}
    for _ in range(args.runs):
        for label, argv in todo.items():
            times[label].append(wall_time(argv))
    rows = [{"variant": label, "argv": [Path(todo[label][0]).name, *todo[label][1:]],
             "best_s": min(t), "median_s": statistics.median(t), "times_s": t} for label, t in times.items()]
    lines = ["| process | best (s) | median (s) |", "|---|---|---|"]
    lines += [f"| `{r['variant']}` | {r['best_s']:.3f} | {r['median_s']:.3f} |" for r in rows]
    print("\n".join(lines))
    load_after = os.getloadavg()[0]
    import torch

    result = {
        "benchmark": "startup", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_avg_1m": [load_before, load_after], "python": platform.python_version(), "torch": torch.__version__,
        "runs": args.runs,
        "command": f"flock /tmp/deltakit-bench.lock python3 analyses/bench_startup.py --runs {args.runs}",
        "rows": rows, "table": "\n".join(lines),
    }
    out = ROOT / "docs" / "benchmarks" / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
