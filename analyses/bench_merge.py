"""Benchmark: `deltakit merge` vs mergekit 0.1.5 on a Qwen2.5-0.5B-shaped bf16 pair, side by side in one run.

Builds two bf16 checkpoints of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 kv heads,
intermediate 4864, vocab 151936, tied embeddings; ~1 GB each) in a temporary folder: A from a seeded
random init, B = A plus Gaussian noise (deltakit.tiny.save_partner_llm). Then, for `linear` (0.9/0.1) and
`ties` (density 0.2, base A, models A and B), each tool runs in its own child process, merging every
tensor (embeddings included, so both do the same work) in float32 and writing bf16. A child reports its
wall time for the merge call and its peak RSS (VmHWM); a few merged tensors of both outputs are
compared. Prints a markdown table and writes docs/benchmarks/merge.json.

    python analyses/bench_merge.py [--repeats N] [--keep DIR]
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


def build_pair(folder: Path) -> tuple[Path, Path]:
    import torch
    import transformers

    from deltakit.tiny import save_partner_llm, text_config

    a, b = folder / "A", folder / "B"
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**text_config("qwen2", **SHAPE))
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(a)
    del model
    save_partner_llm(a, b, noise=0.3, seed=1, dtype=torch.bfloat16)
    return a, b


def recipe(method: str, a: Path, b: Path) -> dict:
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.9}},
                                                     {"model": str(b), "parameters": {"weight": 0.1}}]}
    return {"merge_method": "ties", "base_model": str(a), "parameters": {"density": 0.2},
            "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}


def _vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM). Unlike ru_maxrss it is not inherited from the parent across fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(tool: str, method: str, a: Path, b: Path, out: Path) -> None:
    """Run one merge in this process and print {seconds, peak_rss_mb} as JSON."""
    config = {**recipe(method, a, b), "dtype": "float32", "out_dtype": "bfloat16"}
    if tool == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        cfg = MergeConfiguration.model_validate(config)
        start = time.perf_counter()
        run_merge(cfg, str(out), MergeOptions(copy_tokenizer=False, lazy_unpickle=True, quiet=True))
    else:
        from deltakit.merge import MergeConfig, merge

        cfg = MergeConfig.from_dict({**config, "modules": ["attn", "mlp", "norm", "embed", "lm_head"]})
        start = time.perf_counter()
        merge(cfg, out)
    seconds = time.perf_counter() - start
    rss = _vm_hwm_mb()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss}))


def run_child(tool: str, method: str, a: Path, b: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", tool, method, str(a), str(b), str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(f"{tool} {method} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


COMPARED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.11.mlp.down_proj.weight", "model.norm.weight",
            "model.embed_tokens.weight")


def compare(method: str, folder: Path) -> dict:
    """How the two outputs differ on a few tensors.

    ``max_diff_bf16_ulps``: largest |deltakit - mergekit| in units of bf16 spacing at that value. For ties
    also ``differing``: the fraction of entries that differ, and ``differing_off_ties``: how many of those
    do not sit on the k-th largest |delta| (entries tied there are kept in row-major order by deltakit
    and in an unspecified order by mergekit's argsort; everything else must agree).
    """
    import torch

    from deltakit.io.checkpoint import Checkpoint

    out = {"max_diff_bf16_ulps": 0.0, "differing": 0.0, "differing_off_ties": 0}
    n = 0
    with Checkpoint.open(folder / f"out_deltakit_{method}") as x, Checkpoint.open(folder / f"out_mergekit_{method}") as y, \
            Checkpoint.open(folder / "A") as a, Checkpoint.open(folder / "B") as b:
        for key in COMPARED:
            p, q = x.get(key).float(), y.get(key).float()
            ulp = torch.finfo(torch.bfloat16).eps * p.abs().clamp_min(1e-6)
            out["max_diff_bf16_ulps"] = max(out["max_diff_bf16_ulps"], float(((p - q).abs() / ulp).max()))
            differ = p != q
            out["differing"] += int(differ.sum())
            n += p.numel()
            if method == "ties":
                d = (b.get(key).float() - a.get(key).float()).abs().reshape(-1)
                t = torch.kthvalue(d, d.numel() - max(1, int(0.2 * d.numel())) + 1).values
                out["differing_off_ties"] += int((differ.reshape(-1) & (d != t)).sum())
    out["differing"] /= n
    return out


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="Reuse/keep the checkpoints in this folder.")
    parser.add_argument("--methods", default="linear,ties")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_merge_"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        a, b = folder / "A", folder / "B"
        if not (a.exists() and b.exists()):
            build_pair(folder)
        rows = []
        for method in args.methods.split(","):
            runs = {"deltakit": [], "mergekit": []}
            for _ in range(args.repeats):
                for tool in ("mergekit", "deltakit"):
                    runs[tool].append(run_child(tool, method, a, b, folder / f"out_{tool}_{method}"))
            best = {t: min(r, key=lambda x: x["seconds"]) for t, r in runs.items()}
            peak = {t: max(x["peak_rss_mb"] for x in r) for t, r in runs.items()}
            rows.append({
                "method": method, "runs": runs,
                "deltakit_s": best["deltakit"]["seconds"], "mergekit_s": best["mergekit"]["seconds"],
                "speedup": best["mergekit"]["seconds"] / best["deltakit"]["seconds"],
                "deltakit_rss_mb": peak["deltakit"], "mergekit_rss_mb": peak["mergekit"],
                "rss_ratio": peak["deltakit"] / peak["mergekit"],
                **compare(method, folder),
            })
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    goals = {"linear": 5.0, "ties": 10.0}
    lines = ["| method | mergekit s | deltakit s | speedup (goal) | mergekit peak RSS MB | deltakit peak RSS MB | RSS ratio (goal <= 0.5) | entries differing (off threshold ties) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['mergekit_s']:.1f} | {r['deltakit_s']:.1f} | {r['speedup']:.1f}x (>= {goals[r['method']]:.0f}x) | "
                     f"{r['mergekit_rss_mb']:.0f} | {r['deltakit_rss_mb']:.0f} | {r['rss_ratio']:.2f} | {r['differing']:.2%} ({r['differing_off_ties']}) |")
    print("\n".join(lines))
    import mergekit
    import torch

    result = {
        "benchmark": "merge", "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {_cpu_model()}",
        "load_avg_after": os.getloadavg(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "mergekit": getattr(mergekit, "__version__", "0.1.5"),
        "shape": SHAPE, "dtype": "bf16 in, float32 compute, bf16 out", "repeats": args.repeats,
        "command": "python analyses/bench_merge.py" + (f" --repeats {args.repeats}" if args.repeats != 1 else ""),
        "rows": rows, "table": "\n".join(lines),
    }
    out = ROOT / "docs" / "benchmarks" / "merge.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], *(Path(p) for p in sys.argv[4:7]))
    else:
        main()
