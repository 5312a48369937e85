"""Benchmark: `deltakit prior` export time, peak RSS, size and fidelity per dtype/compression on a Qwen2.5-0.5B-shaped pair.

Builds, in a temporary folder, a bf16 Qwen2.5-VL checkpoint whose text tower has Qwen2.5-0.5B's shape
(hidden 896, 24 layers, 14 heads / 2 kv heads, intermediate 4864, vocab 151936, tied embeddings; a
token vision tower) from seeded random weights, and two bf16 Qwen2 "reasoning" LLMs of the same shape:

- ``gauss``: W_LLM = W_MLLM + 0.3 std(W) N(0, 1) per tensor: D is i.i.d. noise, the worst case for
  lowrank and topk (no structure to keep).
- ``decay``: W_LLM = W_MLLM + a matrix noise with singular values s_i ~ 1/sqrt(i + 1) (random singular
  vectors), the same Frobenius size: a synthetic stand-in for a fine-tuning delta whose spectrum decays.

Every export runs in its own child process (default modules attn + mlp, 24 layers, 357M parameters) and
reports the export call's wall time and the child's peak RSS (VmHWM, not inherited across fork+exec); a
child that only imports deltakit and torch gives the baseline RSS. One untimed export per pair first
brings the checkpoints into the page cache, so every timed run reads warm files. Fidelity is the cosine between the
float32 D and what Prior.get returns, as export_prior reports it. Prints a markdown table and writes
docs/benchmarks/prior.json. Run it under the shared lock:

    flock /tmp/deltakit-bench.lock python3 analyses/bench_prior.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tie=True)
VARIANTS = [  # (pair, dtype, compression, extra export kwargs)
    ("gauss", "bfloat16", None, {}),
    ("gauss", "bfloat16", None, {"layers": "0:12"}),
    ("gauss", "float32", None, {}),
    ("gauss", "bfloat16", None, {"normalize": True}),
    ("gauss", "bfloat16", "int8", {}),
    ("gauss", "bfloat16", "topk:0.1", {}),
    ("gauss", "bfloat16", "topk:0.01", {}),
    ("gauss", "bfloat16", "lowrank:64", {}),
    ("decay", "bfloat16", "int8", {}),
    ("decay", "bfloat16", "topk:0.1", {}),
    ("decay", "bfloat16", "topk:0.01", {}),
    ("decay", "bfloat16", "lowrank:16", {}),
    ("decay", "bfloat16", "lowrank:64", {}),
]


def _text_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    h, i, layers = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["layers"]
    kv = h // SHAPE["heads"] * SHAPE["kv_heads"]
    shapes = {f"{prefix}embed_tokens.weight": (SHAPE["vocab"], h), f"{prefix}norm.weight": (h,)}
    for n in range(layers):
        p = f"{prefix}layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def _decaying_noise(shape: tuple[int, ...], gen) -> "torch.Tensor":
    """Random matrix with singular values ~ 1/sqrt(i + 1) and random singular vectors, unit Frobenius norm."""
    import torch

    m, n = shape
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = 1 / torch.arange(1, k + 1, dtype=torch.float32).sqrt()
    out = (u * s) @ v.T
    return out / out.norm()


def build(folder: Path) -> dict[str, Path]:
    """The MLLM and the two LLMs, written tensor by tensor (never a whole model in memory)."""
    import torch

    from deltakit.io.writer import ShardedWriter, TensorSpec
    from deltakit.tiny import text_config, tiny_config

    paths = {"mllm": folder / "mllm", "gauss": folder / "gauss", "decay": folder / "decay"}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    tiny_config("qwen2_5_vl", **SHAPE).save_pretrained(paths["mllm"])
    import transformers

    llm_config = transformers.AutoConfig.for_model(**text_config("qwen2", **SHAPE))
    for k in ("gauss", "decay"):
        llm_config.save_pretrained(paths[k])
    vision = {"visual.patch_embed.proj.weight": (16, 3, 2, 14, 14), "visual.merger.mlp.0.weight": (64, 64)}
    mllm_shapes = {**_text_shapes("model."), **vision}
    llm_shapes = _text_shapes("model.")
    bf16 = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    writers = {
        "mllm": ShardedWriter(paths["mllm"], [TensorSpec(k, bf16, s) for k, s in mllm_shapes.items()]),
        "gauss": ShardedWriter(paths["gauss"], [TensorSpec(k, bf16, s) for k, s in llm_shapes.items()]),
        "decay": ShardedWriter(paths["decay"], [TensorSpec(k, bf16, s) for k, s in llm_shapes.items()]),
    }
    for key, shape in mllm_shapes.items():
        if len(shape) == 1:
            w = (1 + 0.1 * torch.randn(shape, generator=gen)) if key.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=gen)
        else:
            w = 0.02 * torch.randn(shape, generator=gen)
        writers["mllm"].write(key, w.to(bf16))
        if key not in llm_shapes:
            continue
        size = 0.3 * float(w.std()) * w.numel() ** 0.5
        if "embed_tokens" in key:
            writers["gauss"].write(key, w.to(bf16))
            writers["decay"].write(key, w.to(bf16))
            continue
        writers["gauss"].write(key, (w + 0.3 * w.std() * torch.randn(shape, generator=gen)).to(bf16))
        noise = _decaying_noise(shape, gen) * size if len(shape) == 2 else 0.3 * w.std() * torch.randn(shape, generator=gen)
        writers["decay"].write(key, (w + noise).to(bf16))
    for w in writers.values():
        w.close()
    return paths


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(spec: dict) -> None:
    """One export in this process; prints seconds, peak RSS and the report's totals as JSON."""
    import torch  # noqa: F401  (imported before timing, like the baseline child)

    from deltakit.prior import export_prior

    if spec.get("baseline"):
        print(json.dumps({"peak_rss_mb": _vm_hwm_mb()}))
        return
    start = time.perf_counter()
    report = export_prior(spec["mllm"], spec["llm"], spec["out"], dtype=spec["dtype"], compress=spec["compress"],
                          force=True, **spec["kw"])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": _vm_hwm_mb(), "bytes_on_disk": report.bytes_on_disk,
                      "totals": report.totals}))


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="Reuse/keep the checkpoints in this folder.")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_prior_"))
    rows = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {k: folder / k for k in ("mllm", "gauss", "decay")}
        if not all((p / "model.safetensors.index.json").exists() for p in paths.values()):
            start = time.perf_counter()
            build(folder)
            print(f"built the pair in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        baseline = run_child({"baseline": True})["peak_rss_mb"]
        for pair in ("gauss", "decay"):  # untimed: bring the checkpoints into the page cache, as for every timed run
            run_child({"mllm": str(paths["mllm"]), "llm": str(paths[pair]), "out": str(folder / "prior.safetensors"),
                       "dtype": "bfloat16", "compress": None, "kw": {}})
        model_mb = sum(f.stat().st_size for f in paths["mllm"].glob("*.safetensors")) / 1e6
        for pair, dtype, compress, kw in VARIANTS:
            spec = {"mllm": str(paths["mllm"]), "llm": str(paths[pair]), "out": str(folder / "prior.safetensors"),
                    "dtype": dtype, "compress": compress, "kw": kw}
            r = run_child(spec)
            t = r["totals"]
            rows.append({"pair": pair, "dtype": dtype, "compress": compress or "none", "options": kw, **r,
                         "size_ratio": t["data_bytes"] / (t["params"] * 2)})
            print(f"{pair} {dtype} {compress} {kw}: {r['seconds']:.1f} s, {r['peak_rss_mb']:.0f} MB, "
                  f"{r['bytes_on_disk'] / 1e6:.1f} MB, cosine {t['cosine']:.6f}", file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    lines = ["| D | dtype | compression | options | export s | peak RSS MB (baseline %.0f) | MB on disk | vs full bf16 | cosine | rel. error |" % baseline,
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["totals"]
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        lines.append(f"| {r['pair']} | {r['dtype']} | {r['compress']} | {opts} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['bytes_on_disk'] / 1e6:.1f} | {r['size_ratio']:.3f} | {t['cosine']:.6f} | {t['rel_error']:.4f} |")
    print("\n".join(lines))
    import torch

    result = {
        "benchmark": "prior", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "shape": SHAPE, "modules": "attn,mlp (default)", "mllm_bytes_mb": model_mb,
        "baseline_rss_mb": baseline, "command": "flock /tmp/deltakit-bench.lock python3 analyses/bench_prior.py",
        "rows": rows, "table": "\n".join(lines),
    }
    out = ROOT / "docs" / "benchmarks" / "prior.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        main()
