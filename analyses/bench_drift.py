"""Step time and peak memory of DRIFT (each rule) against plain SFT, and against the public code's hook approach.

All variants run the same optimizer step of :func:`deltakit.train.loop.train_step` (2 micro-batches,
clipping, AdamW) on one Qwen2.5-VL-shaped model built in memory, interleaved round by round so that
load on a shared machine hits every variant alike; the median step time is reported. Because whole
steps are noisy on a shared machine, the bias work alone (what DRIFT adds to a step) is also timed on
real gradients, many times, and reported as a fraction of the SFT step. Both are reported as the
median and as the minimum (best of N: on a machine shared with other jobs, the minimum is the run
least disturbed by them, so the ratios of minima are the most repeatable). Variants:

- ``sft``: no prior;
- ``absolute``, ``gradnorm``, ``adaptive``: :class:`deltakit.drift.DriftBias`, D resident on the device,
  applied once per step to the accumulated gradient;
- ``public-hook``: what the public DRIFT code does: a per-parameter backward hook that copies D from
  CPU memory and applies the adaptive rule on every backward call, i.e. on each micro-batch's local
  gradient (on a CPU-only machine the "transfer" is a host memcpy).

Peak memory is the peak resident set (VmHWM) of a fresh process per variant (model + optimizer + D +
3 steps); on a GPU it is ``torch.cuda.max_memory_allocated``.

    python analyses/bench_drift.py [--hidden 768 --layers 4 --seq 256 --rounds 9 --repeats 30 --device cuda --bf16]

prints a markdown table and writes docs/benchmarks/drift.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from deltakit.drift import DriftBias, drift_gradient  # noqa: E402
from deltakit.tiny import build_tiny  # noqa: E402
from deltakit.train.config import TrainConfig  # noqa: E402
from deltakit.train.dist import DistEnv  # noqa: E402
from deltakit.train.loop import token_loss_sum, train_step  # noqa: E402

VARIANTS = ("sft", "absolute", "gradnorm", "adaptive", "public-hook")


class MemoryPrior:
    """A prior held in memory: D for every attention and MLP weight/bias of the text tower."""

    def __init__(self, model: torch.nn.Module, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.tensors = {n.removeprefix("model.language_model."): 0.01 * torch.randn(p.shape, generator=gen)
                        for n, p in model.named_parameters()
                        if n.startswith("model.language_model.layers.") and ("self_attn" in n or ".mlp." in n)}
        self.names = list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name, dtype=None, device=None):
        return self.tensors[name].to(device=device or "cpu", dtype=dtype or self.tensors[name].dtype)

    def alpha(self, name):
        return 1.0


def public_hooks(model: torch.nn.Module, prior: MemoryPrior, rule: str = "adaptive") -> list:
    """The public code's approach: a backward hook per parameter copying D from CPU each call."""
    handles = []
    for name, p in model.named_parameters():
        canonical = name.removeprefix("model.language_model.")
        if canonical in prior.tensors:
            d_cpu = prior.tensors[canonical]
            handles.append(p.register_hook(lambda g, d_cpu=d_cpu: drift_gradient(g, d_cpu.to(g.device, copy=True), 1.0, rule)))
    return handles


def setup(args, device: torch.device):
    model = build_tiny("qwen2_5_vl", seed=0, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                       intermediate=args.intermediate, vocab=args.vocab).train().to(device)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("model.visual."))
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    micro = []
    for _ in range(2):
        ids = torch.randint(0, args.vocab - 16, (args.batch, args.seq), generator=gen)
        labels = ids.clone()
        labels[:, : args.seq // 4] = -100
        micro.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)})
    return model, params, micro


def make_step(variant: str, model, params, micro, prior, device, bf16: bool = False):
    """A zero-argument function running one optimizer step of ``variant`` (bf16 autocast when ``bf16``)."""
    config = TrainConfig(model="m", data="d", out="o", grad_accum=2, lr=1e-6)
    env = DistEnv(0, 1, device, "none")
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    bias = DriftBias.bind(model, prior, rule=variant) if variant in ("absolute", "gradnorm", "adaptive") else None
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        handles = public_hooks(model, prior) if variant == "public-hook" else []
        train_step(model, micro, params, optimizer, 1e-6, bias, env, config, autocast)
        for h in handles:
            h.remove()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variants(args, device) -> dict[str, list[float]]:
    """Whole optimizer steps of every variant, interleaved round by round (order reversed every other round)."""
    model, params, micro = setup(args, device)
    prior = MemoryPrior(model)
    steps = {v: make_step(v, model, params, micro, prior, device, args.bf16) for v in args.variants}
    for v in args.variants:
        steps[v]()
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for v in (args.variants if r % 2 == 0 else args.variants[::-1]):
            sync(device)
            t = time.perf_counter()
            steps[v]()
            sync(device)
            times[v].append(time.perf_counter() - t)
    return times


def time_bias_only(args, device) -> dict[str, tuple[float, float]]:
    """Median and minimum time of the bias work alone per optimizer step, on real gradients (short, so repeatable many times).

    DRIFT rules: one :meth:`DriftBias.apply`. Public hook: what its hooks do per step, i.e. for each
    of the 2 micro-batches, copy every D from CPU memory and apply the adaptive rule.
    """
    model, params, micro = setup(args, device)
    prior = MemoryPrior(model)
    token_loss_sum(model, micro[0]).backward()
    work = {rule: DriftBias.bind(model, prior, rule=rule).apply for rule in ("absolute", "gradnorm", "adaptive")}
    targets = [(p, prior.tensors[n.removeprefix("model.language_model.")]) for n, p in model.named_parameters()
               if n.removeprefix("model.language_model.") in prior.tensors]

    def public():
        for _ in range(len(micro)):
            for p, d_cpu in targets:
                drift_gradient(p.grad, d_cpu.to(p.grad.device, copy=True), 1.0, "adaptive")
    work["public-hook"] = public
    out = {}
    for name, fn in work.items():
        fn()
        samples = []
        for _ in range(args.repeats):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            samples.append(time.perf_counter() - t)
        out[name] = (statistics.median(samples), min(samples))
    return out


def vm_hwm_mib() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_child(args, variant: str) -> None:
    device = torch.device(args.device)
    model, params, micro = setup(args, device)
    prior = MemoryPrior(model) if variant != "sft" else None
    step = make_step(variant, model, params, micro, prior, device, args.bf16)
    for _ in range(3):
        step()
    print(torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else vm_hwm_mib())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="examples per micro-batch (2 micro-batches per step)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9, help="whole-step rounds (each runs every variant once)")
    ap.add_argument("--repeats", type=int, default=30, help="repetitions of the bias-only timing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast with float32 master weights (as finetune on a GPU)")
    ap.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "drift.json")
    args = ap.parse_args()
    args.variants = tuple(args.variants.split(","))
    if "sft" not in args.variants or not set(args.variants) <= set(VARIANTS):
        ap.error(f"--variants must include sft and name only {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    if args.memory_child:
        peak_memory_child(args, args.memory_child)
        return
    device = torch.device(args.device)
    times = time_variants(args, device)
    bias_only = time_bias_only(args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the cached blocks back: each memory child needs the whole GPU
    child = [sys.executable, __file__, *sys.argv[1:]]
    memory = {v: float(subprocess.run(child + ["--memory-child", v], check=True, capture_output=True, text=True).stdout.split()[-1])
              for v in args.variants}
    model, _, _ = setup(args, torch.device("cpu"))
    prior = MemoryPrior(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_prior = sum(t.numel() for t in prior.tensors.values())
    base, base_min = statistics.median(times["sft"]), min(times["sft"])
    rows = []
    for v in args.variants:
        med, best = statistics.median(times[v]), min(times[v])
        bias_med, bias_min = bias_only.get(v, (0.0, 0.0))
        rows.append({"variant": v, "step_s": med, "step_overhead_pct": 100 * (med / base - 1),
                     "step_min_s": best, "step_min_overhead_pct": 100 * (best / base_min - 1),
                     "bias_s": bias_med, "bias_overhead_pct": 100 * bias_med / base,
                     "bias_min_s": bias_min, "bias_min_overhead_pct": 100 * bias_min / base_min,
                     "step_samples_s": times[v], "peak_mib": memory[v], "memory_delta_mib": memory[v] - memory["sft"]})
    result = {
        "command": "python analyses/bench_drift.py " + " ".join(sys.argv[1:]),
        "device": args.device, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": {"family": "qwen2_5_vl", "hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                  "vocab": args.vocab, "parameters": n_params, "prior_parameters": n_prior},
        "precision": "bf16 autocast, float32 master weights" if args.bf16 else "float32",
        "batch": {"micro_batches": 2, "examples_per_micro_batch": args.batch, "tokens_per_example": args.seq},
        "rounds": args.rounds, "repeats": args.repeats,
        "memory": "peak resident set (VmHWM) of a fresh process per variant" if device.type == "cpu" else "torch.cuda.max_memory_allocated",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Qwen2.5-VL-shaped model, {n_params / 1e6:.1f}M parameters ({n_prior / 1e6:.1f}M carry a prior), "
          f"2 micro-batches x {args.batch} x {args.seq} tokens, {args.device}; step: {args.rounds} interleaved rounds; "
          f"bias: {args.repeats} repetitions; each as best (minimum) / median\n")
    print("| variant | step time (s) | step vs SFT | bias work per step (ms) | bias / SFT step | peak memory (MiB) | memory vs SFT (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['step_min_s']:.3f} / {r['step_s']:.3f} | {r['step_min_overhead_pct']:+.1f}% / "
              f"{r['step_overhead_pct']:+.1f}% | {1000 * r['bias_min_s']:.1f} / {1000 * r['bias_s']:.1f} | "
              f"{r['bias_min_overhead_pct']:.1f}% / {r['bias_overhead_pct']:.1f}% | {r['peak_mib']:.0f} | {r['memory_delta_mib']:+.0f} |")


if __name__ == "__main__":
    main()
