"""Benchmark: `deltakit diff` vs a naive safe_open float32 loop vs the read floor, side by side in one run.

Builds (once; reused when present) two bf16 checkpoints of Qwen2.5-0.5B's shape (hidden 896, 24 layers,
14 heads / 2 kv heads, intermediate 4864, vocab 151936, tied embeddings; ~1 GB each, in 500 MB shards):
A from transformers' seeded random init, B = A plus Gaussian noise (deltakit.tiny.save_partner_llm).
Then, round after round, each contender runs in its own child process and reports the wall time of its
work (imports excluded) and its peak RSS (VmHWM), also above the RSS it had right after its imports:

- deltakit: `deltakit.diagnostics.diff(A, B)` (every per-tensor, per-layer and per-kind figure);
- naive: for each tensor pair, `safe_open(...).get_tensor` both, `.float()`, then dot, |A|, |B| and
  |A-B| in float32 (one tensor pair at a time, torch's own intra-op threads);
- floor: read both models' bytes once with `readinto` into one reused buffer, no math.

Files are in the page cache for every contender (a warm-up read comes first). Prints a markdown table
and writes docs/benchmarks/diff.json. Run it under the shared lock:

    flock /tmp/deltakit-bench.lock python3 analyses/bench_diff.py [--repeats N] [--pair DIR]

The table shows the best and the median of the rounds: on a shared machine the best is the fairer estimate.
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
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tie=True)
DEFAULT_PAIR = Path("/tmp/deltakit-bench/qwen2.5-0.5b-bf16-pair")
CONTENDERS = ("floor", "deltakit", "naive")


def build_pair(folder: Path) -> tuple[Path, Path]:
    """Make (or reuse) the A/B pair under ``folder``; a ``complete`` marker is written last."""
    a, b = folder / "A", folder / "B"
    if (folder / "complete").exists():
        return a, b
    import torch
    import transformers

    from deltakit.tiny import save_partner_llm, text_config

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**text_config("qwen2", **SHAPE))
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(a, max_shard_size="500MB")
    del model
    save_partner_llm(a, b, noise=0.3, seed=1, dtype=torch.bfloat16, max_shard_size="500MB")
    (folder / "complete").write_text("ok\n")
    return a, b


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def run_floor(a: Path, b: Path) -> dict:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    for f in _files(a) + _files(b):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return {"bytes": total}


def run_naive(a: Path, b: Path) -> dict:
    import torch
    from safetensors import safe_open

    def key_to_file(folder: Path) -> dict[str, Path]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        return {k: folder / v for k, v in index.items()}

    where_a, where_b = key_to_file(a), key_to_file(b)
    handles = {f: safe_open(f, framework="pt") for f in {*where_a.values(), *where_b.values()}}
    dot = aa = bb = dd = 0.0
    for key, fa in where_a.items():
        if key not in where_b:
            continue
        x = handles[fa].get_tensor(key).float().flatten()
        y = handles[where_b[key]].get_tensor(key).float().flatten()
        dot += torch.dot(x, y).item()
        aa += torch.linalg.vector_norm(x).item() ** 2
        bb += torch.linalg.vector_norm(y).item() ** 2
        dd += torch.linalg.vector_norm(x - y).item() ** 2
    return {"cosine": dot / (aa * bb) ** 0.5, "l2": dd**0.5}


def run_deltakit(a: Path, b: Path) -> dict:
    from deltakit.diagnostics import diff

    r = diff(a, b)
    return {"cosine": r.overall.cosine, "l2": r.overall.l2, "median_layer_cosine": r.median_layer_cosine,
            "verdict": r.verdict, "tensors": len(r.tensors)}


def child(mode: str, a: Path, b: Path) -> None:
    """Run one contender in this process and print its result, time and memory as JSON."""
    import torch  # noqa: F401  (every contender pays the same import; it is not timed)

    import deltakit.diagnostics  # noqa: F401
    import safetensors.torch  # noqa: F401

    base = _status_mb("VmRSS")
    start = time.perf_counter()
    result = {"floor": run_floor, "naive": run_naive, "deltakit": run_deltakit}[mode](a, b)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "base_rss_mb": base, "above_base_mb": peak - base, **result}))


def spawn(mode: str, a: Path, b: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(a), str(b)], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pair", type=Path, default=DEFAULT_PAIR)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "A", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, a, b = args.child
        child(mode, Path(a), Path(b))
        return
    t = time.perf_counter()
    a, b = build_pair(args.pair)
    print(f"pair ready in {time.perf_counter() - t:.0f} s: {a} {b}", file=sys.stderr)
    spawn("floor", a, b)  # warm the page cache
    runs: dict[str, list[dict]] = {m: [] for m in CONTENDERS}
    for r in range(args.repeats):
        for m in CONTENDERS:
            runs[m].append(spawn(m, a, b))
            print(f"round {r + 1} {m}: {runs[m][-1]['seconds']:.2f} s, peak {runs[m][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    med = {m: {k: statistics.median(x[k] for x in runs[m]) for k in ("seconds", "peak_rss_mb", "above_base_mb")} for m in CONTENDERS}
    best = {m: min(x["seconds"] for x in runs[m]) for m in CONTENDERS}
    nbytes = runs["floor"][0]["bytes"]
    dk, nv = runs["deltakit"][0], runs["naive"][0]
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {__import__('torch').__version__}",
        "pair": {"shape": SHAPE, "dtype": "bfloat16", "bytes_both": nbytes, "path": str(args.pair)},
        "repeats": args.repeats,
        "median": med,
        "best_seconds": best,
        "runs": runs,
        "ratios": {
            "naive_over_deltakit_time": med["naive"]["seconds"] / med["deltakit"]["seconds"],
            "deltakit_over_floor_time": med["deltakit"]["seconds"] / med["floor"]["seconds"],
            "naive_over_deltakit_best_time": best["naive"] / best["deltakit"],
            "deltakit_over_floor_best_time": best["deltakit"] / best["floor"],
            "deltakit_throughput_gb_s": nbytes / med["deltakit"]["seconds"] / 1e9,
        },
        "agreement": {"overall_cosine_abs_diff": abs(dk["cosine"] - nv["cosine"]), "overall_l2_rel_diff": abs(dk["l2"] - nv["l2"]) / dk["l2"]},
        "deltakit_result": {k: dk[k] for k in ("median_layer_cosine", "verdict", "tensors")},
    }
    out = ROOT / "docs" / "benchmarks" / "diff.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| contender | time (s, best / median of {args.repeats}) | peak RSS (MB) | above import baseline (MB) |")
    print("|---|---|---|---|")
    for m in CONTENDERS:
        print(f"| {m} | {best[m]:.2f} / {med[m]['seconds']:.2f} | {med[m]['peak_rss_mb']:.0f} | {med[m]['above_base_mb']:.0f} |")
    print(json.dumps(result["ratios"]), json.dumps(result["agreement"]))


if __name__ == "__main__":
    main()
