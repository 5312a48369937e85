"""Benchmark: `deltakit merge` vs mergekit 0.1.5 on a Qwen2.5-0.5B-shaped bf16 pair, side by side in one run.

Builds three bf16 checkpoints of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 kv heads,
intermediate 4864, vocab 151936, tied embeddings; ~1 GB each; ``--size 3b``: Qwen2.5-3B's, ~6 GB each) in
a temporary folder: A from a seeded random init, B and C = A plus Gaussian noise
(deltakit.tiny.save_partner_llm). Then, for every merge method (:func:`recipe`: A is the base of the
methods that take one), each tool runs in its own child process, merging every tensor (embeddings
included, so both do the same work) in float32 and writing bf16, each starting with its inputs read into the
page cache (:func:`warm`). A child reports its wall time for the
merge call, the time until its output is on disk (``synced_seconds``: deltakit's merge ends with an ``fsync``,
mergekit's does not, so the child fsyncs its files), and its peak RSS (VmHWM); a few merged tensors of both outputs
are compared. Prints a markdown table and writes docs/benchmarks/merge.json (merge-3b.json).

    python analyses/bench_merge.py [--repeats N] [--keep DIR] [--methods a,b] [--size 0.5b|3b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tie=True)


def build_pair(folder: Path) -> tuple[Path, Path, Path]:
    import torch
    import transformers

    from deltakit.tiny import save_partner_llm, text_config

    a, b, c = folder / "A", folder / "B", folder / "C"
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**text_config("qwen2", **SHAPE))
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(a)
    del model
    save_partner_llm(a, b, noise=0.3, seed=1, dtype=torch.bfloat16)
    save_partner_llm(a, c, noise=0.3, seed=2, dtype=torch.bfloat16)
    return a, b, c


def _m(path: Path, **params) -> dict:
    return {"model": str(path), "parameters": params} if params else {"model": str(path)}


def recipe(method: str, a: Path, b: Path, c: Path) -> dict:
    """The benchmarked recipe of ``method``: A is the base of every method that takes one; B and C are its fine-tunes."""
    two = [_m(a, weight=0.5), _m(b, weight=0.5)]  # A skipped as the base where there is one, as in mergekit
    gta = {"base_model": str(a), "models": [_m(b, weight=0.6), _m(c, weight=0.4)]}
    return {
        "linear": {"models": [_m(a, weight=0.9), _m(b, weight=0.1)]},
        "task_arithmetic": {**gta, "parameters": {"lambda": 0.9}},
        "ties": {"base_model": str(a), "parameters": {"density": 0.2}, "models": two},
        "dare_linear": {**gta, "parameters": {"density": 0.3}},
        "dare_ties": {**gta, "parameters": {"density": 0.3}},
        "breadcrumbs": {**gta, "parameters": {"density": 0.3, "gamma": 0.01}},
        "breadcrumbs_ties": {**gta, "parameters": {"density": 0.3, "gamma": 0.01}},
        "della": {**gta, "parameters": {"density": 0.4, "epsilon": 0.1}},
        "della_linear": {**gta, "parameters": {"density": 0.4, "epsilon": 0.1}},
        "slerp": {"base_model": str(a), "models": [_m(a), _m(b)], "parameters": {"t": [0.0, 0.5, 0.3, 0.7, 1.0]}},
        "nuslerp": {"base_model": str(a), "models": [_m(b, weight=0.5), _m(c, weight=0.5)]},
        "multislerp": {"base_model": str(a), "models": [_m(b, weight=0.5), _m(c, weight=0.5)]},
        "karcher": {"models": [_m(a), _m(b), _m(c)]},
        "model_stock": {"base_model": str(a), "models": [_m(b), _m(c)]},
        "nearswap": {"base_model": str(a), "models": [_m(a), _m(b)], "parameters": {"t": 0.001}},
        "sce": {"base_model": str(a), "models": [_m(b), _m(c)], "parameters": {"select_topk": 0.3}},
    }[method] | {"merge_method": method}


RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
           "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "sce")


def _vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM). Unlike ru_maxrss it is not inherited from the parent across fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    """CPU seconds of this process so far, every thread, user and system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(tool: str, method: str, a: Path, b: Path, c: Path, out: Path) -> None:
    """Run one merge in this process and print {seconds, synced_seconds, cpu_seconds (of the merge call, every
    thread, user and system), peak_rss_mb} as JSON."""
    config = {**recipe(method, a, b, c), "dtype": "float32", "out_dtype": "bfloat16"}
    if tool == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        cfg = MergeConfiguration.model_validate(config)
        cpu, start = _cpu(), time.perf_counter()
        run_merge(cfg, str(out), MergeOptions(copy_tokenizer=False, lazy_unpickle=True, quiet=True))
    else:
        from deltakit.merge import MergeConfig, merge

        cfg = MergeConfig.from_dict({**config, "modules": ["attn", "mlp", "norm", "embed", "lm_head"]})
        cpu, start = _cpu(), time.perf_counter()
        merge(cfg, out)
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    for f in sorted(out.iterdir()):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    synced = time.perf_counter() - start
    rss = _vm_hwm_mb()
    print(json.dumps({"seconds": seconds, "synced_seconds": synced, "cpu_seconds": cpu, "peak_rss_mb": rss}))


def warm(method: str, a: Path, b: Path, c: Path) -> float:
    """Read the recipe's input checkpoints into the page cache (each tool starts as the 0.5B runs do, with its
    inputs cached; at 3B the 24 GB machine cannot keep every input and output cached across runs). Seconds."""
    r = recipe(method, a, b, c)
    paths = {Path(m["model"]) for m in r["models"]} | ({Path(r["base_model"])} if "base_model" in r else set())
    start = time.perf_counter()
    for path in sorted(paths):
        for f in sorted(path.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    return time.perf_counter() - start


def run_child(tool: str, method: str, a: Path, b: Path, c: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    warmed = warm(method, a, b, c)
    cmd = [sys.executable, __file__, "--child", tool, method, str(a), str(b), str(c), str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(f"{tool} {method} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    result["warm_seconds"] = warmed
    return result


COMPARED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.11.mlp.down_proj.weight", "model.norm.weight",
            "model.embed_tokens.weight")


def compare(method: str, folder: Path) -> dict:
    """How the two outputs differ on a few tensors.

    ``max_diff_bf16_ulps``: largest |deltakit - mergekit| in units of bf16 spacing at that value;
    ``differing``: the fraction of entries that differ. For the random methods (seeded blocks here, the
    global torch RNG there) entries cannot agree; ``keep_rate``: per tool, the fraction of entries the
    merge moved away from the base A (the same expected value for both).
    """
    import torch

    from deltakit.io.checkpoint import Checkpoint

    out: dict = {"max_diff_bf16_ulps": 0.0, "differing": 0.0}
    n, moved = 0, {"deltakit": 0, "mergekit": 0}
    with Checkpoint.open(folder / f"out_deltakit_{method}") as x, Checkpoint.open(folder / f"out_mergekit_{method}") as y, \
            Checkpoint.open(folder / "A") as a:
        for key in COMPARED:
            p, q, base = x.get(key).float(), y.get(key).float(), a.get(key).float()
            ulp = torch.finfo(torch.bfloat16).eps * p.abs().clamp_min(1e-6)
            out["max_diff_bf16_ulps"] = max(out["max_diff_bf16_ulps"], float(((p - q).abs() / ulp).max()))
            out["differing"] += int((p != q).sum())
            moved["deltakit"] += int((p != base).sum())
            moved["mergekit"] += int((q != base).sum())
            n += p.numel()
    out["differing"] /= n
    if method in RANDOM:
        out["keep_rate"] = {tool: m / n for tool, m in moved.items()}
    return out


def _machine() -> str:
    """The architecture and CPU model, as recorded with each result."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{platform.machine()} {line.split(':', 1)[1].strip()}"
    return f"{platform.machine()} {platform.processor()}"


SIZES = {"0.5b": SHAPE, "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vocab=151936, tie=True)}


def write_results(rows: list[dict], args: argparse.Namespace, name: str) -> str:
    """The markdown table of ``rows``, written with the run's machine and load to docs/benchmarks/<name>.json."""
    lines = ["| method | mergekit s | deltakit s | speedup (goal >= 5x) | to disk: mergekit s | deltakit s | speedup | "
             "mergekit peak RSS MB | deltakit peak RSS MB | RSS ratio (goal <= 0.5) | max diff (bf16 ulps) | entries differing |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = (f"random: keep rate {r['keep_rate']['deltakit']:.4f} vs {r['keep_rate']['mergekit']:.4f}" if "keep_rate" in r
                 else f"{r['differing']:.3%}")
        diff = "-" if "keep_rate" in r else f"{r['max_diff_bf16_ulps']:.0f}"
        synced = (f"{r['mergekit_synced_s']:.1f} | {r['deltakit_synced_s']:.2f} | {r['synced_speedup']:.1f}x"
                  if "synced_speedup" in r else "- | - | -")  # rows measured before the column existed
        lines.append(f"| {r['method']} | {r['mergekit_s']:.1f} | {r['deltakit_s']:.2f} | {r['speedup']:.1f}x | {synced} | "
                     f"{r['mergekit_rss_mb']:.0f} | {r['deltakit_rss_mb']:.0f} | {r['rss_ratio']:.2f} | {diff} | {agree} |")
    import mergekit
    import torch

    result = {
        "benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": _machine(),
        "load_avg_after": os.getloadavg(), "load_avg_per_run": [[r["method"], r["load_avg"]] for r in rows],
        "cpus": os.cpu_count(), "torch": torch.__version__, "mergekit": getattr(mergekit, "__version__", "0.1.5"),
        "shape": SHAPE, "dtype": "bf16 in, float32 compute, bf16 out", "repeats": args.repeats,
        "command": " ".join(["python analyses/bench_merge.py", *sys.argv[1:]]),
        "commands": sorted({r.get("command", "") for r in rows}),
        "rows": rows, "table": "\n".join(lines),
    }
    out = ROOT / "docs" / "benchmarks" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return "\n".join(lines)


def main() -> None:
    global SHAPE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="Reuse/keep the checkpoints in this folder.")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--size", choices=list(SIZES), default="0.5b", help="Qwen2.5-0.5B's shape or Qwen2.5-3B's.")
    parser.add_argument("--append", action="store_true", help="Keep the other methods' rows of the existing JSON (rerun some).")
    args = parser.parse_args()
    SHAPE = SIZES[args.size]
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_merge_"))
    name = "merge" if args.size == "0.5b" else f"merge-{args.size}"
    rows = []
    machine = _machine()
    from deltakit.engine import fused

    native = fused.native() is not None  # deltakit's C kernels built (deltakit/engine/_fused.c)
    previous = ROOT / "docs" / "benchmarks" / f"{name}.json"
    if args.append and previous.exists():  # a kept row keeps the machine it was measured on
        kept = json.loads(previous.read_text())
        rows = [{"machine": kept["machine"], **r} for r in kept["rows"] if r["method"] not in args.methods.split(",")]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = folder / "A", folder / "B", folder / "C"
        if not (a.exists() and b.exists() and c.exists()):
            build_pair(folder)
        for method in args.methods.split(","):
            runs = {"deltakit": [], "mergekit": []}
            load = os.getloadavg()
            for _ in range(args.repeats):
                for tool in ("mergekit", "deltakit"):
                    runs[tool].append(run_child(tool, method, a, b, c, folder / f"out_{tool}_{method}"))
            best = {t: min(r, key=lambda x: x["seconds"]) for t, r in runs.items()}
            synced = {t: min(x["synced_seconds"] for x in r) for t, r in runs.items()}
            peak = {t: max(x["peak_rss_mb"] for x in r) for t, r in runs.items()}
            rows.append({
                "method": method, "machine": machine, "recipe": recipe(method, a, b, c),
                "runs": runs, "load_avg": load,
                "command": " ".join(["python analyses/bench_merge.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M"),
                "deltakit_s": best["deltakit"]["seconds"], "mergekit_s": best["mergekit"]["seconds"],
                "speedup": best["mergekit"]["seconds"] / best["deltakit"]["seconds"],
                "deltakit_synced_s": synced["deltakit"], "mergekit_synced_s": synced["mergekit"],
                "synced_speedup": synced["mergekit"] / synced["deltakit"], "c_kernels": native,
                "deltakit_cpu_s": best["deltakit"]["cpu_seconds"], "mergekit_cpu_s": best["mergekit"]["cpu_seconds"],
                "deltakit_rss_mb": peak["deltakit"], "mergekit_rss_mb": peak["mergekit"],
                "rss_ratio": peak["deltakit"] / peak["mergekit"],
                **compare(method, folder),
            })
            for tool in ("mergekit", "deltakit"):
                shutil.rmtree(folder / f"out_{tool}_{method}", ignore_errors=True)
            write_results(rows, args, name)  # after every method, so an interrupted run keeps what it measured
            r = rows[-1]
            print(f"{method}: mergekit {r['mergekit_s']:.1f} s / {r['mergekit_rss_mb']:.0f} MB, deltakit {r['deltakit_s']:.1f} s / "
                  f"{r['deltakit_rss_mb']:.0f} MB", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(write_results(rows, args, name))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], *(Path(p) for p in sys.argv[4:8]))
    else:
        main()
