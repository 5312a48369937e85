"""The fine-tuning data pipeline, before and after the processed-once cache, and the padding of each batching.

1. **Examples per second** of the processor path with Qwen2.5-VL's image processor at its published pixel
   limits (``min_pixels`` 3136 = 4 patches of 28 px, ``max_pixels`` 12845056 = 16384 of them, the values of
   ``Qwen/Qwen2.5-VL-7B-Instruct``'s ``preprocessor_config.json``) on JPEG images of 448-1344 px a side, with
   long-tailed chain-of-thought answers. *Before*: the pipeline up to this change, which ran the processor
   three times per one-turn example (the conversation and the two prefixes around the answer) on every
   access, i.e. every epoch. *After*: one processor pass per example, once, into the cache (0 and 2 worker
   processes), then every epoch reads the memory-mapped cache. Measured side by side in one run, each
   variant on the same examples, interleaved over ``--rounds``.
2. **Share of a training step waiting for data** on this CPU: ``deltakit finetune`` on the tiny Qwen2.5-VL
   (``deltakit.tiny``) with those examples, reading the cache with 0 and 1 loader workers, and with the
   before-path in the training process; the median of ``data_s / step_s`` over the steps after the first.
3. **Padding per step** on a long-tailed length distribution like the paper's (4K examples, a few hundred
   to ~1300 image tokens, chain-of-thought answers log-normal around 1.2K tokens, cut at 32K): plain
   padding to the longest of each micro-batch, length grouping, packing.
4. **Pixel storage** (``--cache-pixels``): bytes per example of a cache entry, its build and its read rate, for
   float32 pixels, bf16 pixels and none (pixels recomputed from the images on every read); ``--pixels-only``
   measures just this and updates the ``pixels`` entry of the JSON.

The tokenizer is deltakit's tiny BPE (the real Qwen tokenizer is not available offline; both are Rust
``tokenizers``, so the text part is a small share of the time next to the images).

    python analyses/bench_data.py [--examples 24 --rounds 2 --steps 6] [--pixels-only]

prints markdown tables and writes docs/benchmarks/data.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from deltakit.data import SFTDataset, _n_images, load_examples, open_image, render  # noqa: E402
from deltakit.datacache import CachedDataset, cached_dataset  # noqa: E402
from deltakit.train.loader import StepOrder  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 3136, 12845056  # Qwen2.5-VL-7B-Instruct preprocessor_config.json
WORDS = ("the red circle is left of two blue squares so we count three shapes and the answer follows from the sum "
         "of their areas which we compute step by step").split()


def make_data(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` one-image records: JPEGs of 448-1344 px a side (drawn shapes), answers of log-normal length."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        w, h = rng.randint(448, 1344), rng.randint(448, 1344)
        img = Image.new("RGB", (w, h), (rng.randint(180, 255),) * 3)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y, r = rng.randint(0, w), rng.randint(0, h), rng.randint(20, 160)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        img.save(root / "images" / f"{i}.jpg", quality=90)
        words = min(4000, int(math.exp(rng.gauss(math.log(600), 0.8))))
        answer = "<think>" + " ".join(rng.choice(WORDS) for _ in range(words)) + "</think> The answer is \\boxed{3}."
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<image>How many shapes are there?"},
                                              {"role": "assistant", "content": answer}], "images": [f"images/{i}.jpg"]}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def published_processor(model_dir: Path):
    """The tiny model's processor with Qwen2.5-VL's published image processor settings, saved into ``model_dir``."""
    import transformers

    from deltakit.tiny_processor import build_tiny_processor

    proc = build_tiny_processor()
    proc.image_processor = transformers.Qwen2VLImageProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    proc.save_pretrained(model_dir)
    return transformers.AutoProcessor.from_pretrained(model_dir)


class ThreePass(torch.utils.data.Dataset):
    """The pipeline before: the processor on the whole conversation and on both prefixes of each answer, per access."""

    def __init__(self, examples, processor):
        self.examples, self.processor = examples, processor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex, proc = self.examples[i], self.processor
        images = [open_image(p) for p in ex.images]

        def enc(text, imgs):
            return proc(text=[text], return_tensors="pt", **({"images": imgs} if imgs else {}))

        out = enc(render(proc, ex.messages, False), images)
        ids = out["input_ids"][0]
        labels = torch.full_like(ids, -100)
        for turn, msg in enumerate(ex.messages):
            if msg["role"] == "assistant":
                a = enc(render(proc, ex.messages[:turn], True), images[:_n_images(ex.messages[:turn])])["input_ids"][0]
                b = enc(render(proc, ex.messages[:turn + 1], False).rstrip(), images[:_n_images(ex.messages[:turn + 1])])["input_ids"][0]
                labels[len(a):len(b)] = ids[len(a):len(b)]
        item = {"input_ids": ids, "labels": labels, "mm_token_type_ids": out["mm_token_type_ids"][0]}
        item.update({k: out[k] for k in ("pixel_values", "image_grid_thw")})
        return item


def _rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def throughput(data: Path, processor, rounds: int, tmp: Path) -> dict:
    """Examples per second of each path, interleaved over ``rounds``."""
    examples = load_examples(data)
    n = len(examples)
    old = ThreePass(examples, processor)
    new = SFTDataset(examples, processor)
    rates: dict[str, list[float]] = {"before: 3 passes per access": [], "after: 1 pass (cache build, 0 workers)": [],
                                     "after: cache build, 2 workers": [], "after: cache hit (open, a later run)": [],
                                     "after: cached read": []}
    for r in range(rounds):
        rates["before: 3 passes per access"].append(_rate(lambda: [old[i] for i in range(n)], n))
        rates["after: 1 pass (cache build, 0 workers)"].append(_rate(lambda: cached_dataset(data, processor, cache_dir=tmp / f"c0-{r}", workers=0), n))
        rates["after: cache build, 2 workers"].append(_rate(lambda: cached_dataset(data, processor, cache_dir=tmp / f"c2-{r}", workers=2), n))
        opened: list[CachedDataset] = []
        rates["after: cache hit (open, a later run)"].append(_rate(lambda: opened.append(cached_dataset(data, processor, cache_dir=tmp / f"c0-{r}")), n))
        cached = opened[0]
        rates["after: cached read"].append(_rate(lambda: [cached[i] for i in range(n)], n))
    same = all(torch.equal(a, b) for i in range(n) for a, b in zip(new[i].values(), cached[i].values()))
    tokens = [len(cached[i]["input_ids"]) for i in range(n)]
    image_tokens = [int((cached[i]["mm_token_type_ids"] == 1).sum()) for i in range(n)]
    cache_bytes = sum(p.stat().st_size for p in cached.folder.iterdir())
    return {"examples": n, "rates": {k: {"median": statistics.median(v), "all": v} for k, v in rates.items()},
            "cached_equals_uncached": same, "tokens": {"min": min(tokens), "median": statistics.median(tokens), "max": max(tokens)},
            "image_tokens": {"min": min(image_tokens), "median": statistics.median(image_tokens), "max": max(image_tokens)},
            "cache_bytes_per_example": cache_bytes / n}


def pixel_storage(data: Path, processor, rounds: int, tmp: Path) -> dict:
    """Per pixel storage: bytes per example of the entry, examples/s of its build and of reading every item in this
    process (``none`` runs the image processor per read), and whether the items equal the uncached ones (bf16: rounded)."""
    examples = load_examples(data)
    n = len(examples)
    reference = SFTDataset(examples, processor)
    out = {}
    for pixels in ("float32", "bfloat16", "none"):
        builds, reads = [], []
        for r in range(rounds):
            opened: list[CachedDataset] = []
            builds.append(_rate(lambda: opened.append(cached_dataset(data, processor, cache_dir=tmp / f"px-{pixels}-{r}", pixels=pixels)), n))
            reads.append(_rate(lambda: [opened[0][i] for i in range(n)], n))
        cached = opened[0]
        size = sum(p.stat().st_size for p in cached.folder.iterdir())
        same = True
        for i in range(n):
            want, got = reference[i], cached[i]
            if pixels == "bfloat16":
                want["pixel_values"] = want["pixel_values"].to(torch.bfloat16)
            same &= want.keys() == got.keys() and all(want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]) for k in want)
        out[pixels] = {"bytes_per_example": size / n, "build": statistics.median(builds), "read": statistics.median(reads),
                       "builds": builds, "reads": reads, "equal": same}
    return out


def wait_share(model_dir: Path, data: Path, steps: int, tmp: Path) -> dict:
    """Mean share of a step spent waiting for data in ``finetune`` on the tiny model, per data path."""
    from deltakit.data import collate, pad_id
    from deltakit.hf import load_processor
    from deltakit.train import TrainConfig, finetune
    from deltakit.train import loop as loop_module

    processor = load_processor(model_dir, "bench")
    base = dict(model=str(model_dir), data=str(data), max_steps=steps, batch_size=1, lr=1e-5, precision="fp32",
                cache_dir=str(tmp / "cache"), log_every=1)
    out: dict[str, dict] = {}

    def record(name, result):
        later = result.history[1:]  # the first step also starts the workers and warms up
        out[name] = {key: statistics.median(r[key] for r in later) for key in ("data_share", "step_s", "data_s", "tokens_per_s")}

    original = loop_module.load_data
    loop_module.load_data = lambda config: (ThreePass(load_examples(data), processor), lambda b: collate(b, pad_id(processor)), processor)
    try:
        record("before: 3 passes in the training process", finetune(TrainConfig(**base, out=str(tmp / "before"), num_workers=0)))
    finally:
        loop_module.load_data = original
    for workers in (0, 1):
        record(f"after: cache, {workers} workers", finetune(TrainConfig(**base, out=str(tmp / f"w{workers}"), num_workers=workers)))
    return out


def padding(n: int = 4000, micro: int = 4, grad_accum: int = 8, cutoff: int = 32768, seed: int = 0) -> dict:
    """Padding tokens per optimizer step (global batch ``micro * grad_accum``) over one epoch, per batching."""
    rng = random.Random(seed)
    lengths = [min(cutoff, 60 + rng.randint(256, 1280) + int(math.exp(rng.gauss(math.log(1200), 0.9)))) for _ in range(n)]
    g = micro * grad_accum
    per_epoch = n // g
    out = {"examples": n, "micro_batch": micro, "global_batch": g, "cutoff": cutoff,
           "lengths": {"median": statistics.median(lengths), "p90": sorted(lengths)[int(0.9 * n)], "max": max(lengths)}}
    for name, order in (("plain", StepOrder(n, g, per_epoch, seed)), ("group_by_length", StepOrder(n, g, per_epoch, seed, lengths))):
        pad = real = 0
        for s in range(per_epoch):
            ids = order.step(s)
            for k in range(0, g, micro):
                mb = [lengths[i] for i in ids[k:k + micro]]
                pad += len(mb) * max(mb) - sum(mb)
                real += sum(mb)
        out[name] = {"padding_per_step": pad / per_epoch, "real_per_step": real / per_epoch, "padding_share": pad / (pad + real)}
    out["packing"] = {"padding_per_step": 0.0, "real_per_step": out["plain"]["real_per_step"], "padding_share": 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "data.json")
    parser.add_argument("--pixels-only", action="store_true", help="measure the pixel storage only; update its entry of --out")
    args = parser.parse_args()
    if args.pixels_only:
        return pixels_only(args)
    torch.manual_seed(0)
    from deltakit.tiny import save_tiny

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = make_data(tmp / "data", args.examples)
        model_dir = save_tiny("qwen2_5_vl", tmp / "model")
        processor = published_processor(model_dir)
        result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": len(__import__("os").sched_getaffinity(0)),
                              "python": platform.python_version(), "torch": torch.__version__,
                              "transformers": __import__("transformers").__version__},
                  "date": datetime.date.today().isoformat(), "pixel_limits": [MIN_PIXELS, MAX_PIXELS],
                  "throughput": throughput(data, processor, args.rounds, tmp), "wait": wait_share(model_dir, data, args.steps, tmp),
                  "padding": padding(), "pixels": pixel_storage(data, processor, args.rounds, tmp)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    t = result["throughput"]
    before = t["rates"]["before: 3 passes per access"]["median"]
    print(f"{t['examples']} examples, {t['tokens']['median']:.0f} tokens median ({t['image_tokens']['median']:.0f} image tokens), "
          f"cache {t['cache_bytes_per_example'] / 2**20:.1f} MiB per example, cached == uncached: {t['cached_equals_uncached']}\n")
    print("| path | examples/s | vs before |\n|---|---|---|")
    for name, r in t["rates"].items():
        print(f"| {name} | {r['median']:.2f} | {r['median'] / before:.1f}x |")
    print("\n| data path in finetune | step (s) | waiting for data (s) | share |\n|---|---|---|---|")
    for name, r in result["wait"].items():
        print(f"| {name} | {r['step_s']:.3f} | {r['data_s']:.3f} | {100 * r['data_share']:.1f}% |")
    p = result["padding"]
    print("\n| batching | padding tokens per step | real tokens per step | padding share |\n|---|---|---|---|")
    for name in ("plain", "group_by_length", "packing"):
        print(f"| {name} | {p[name]['padding_per_step']:,.0f} | {p[name]['real_per_step']:,.0f} | {100 * p[name]['padding_share']:.1f}% |")
    print_pixels(result["pixels"], args.examples)


def print_pixels(pixels: dict, examples: int) -> None:
    print(f"\n| cache pixels | MiB per example | GiB for 4K examples | build (examples/s) | read (examples/s) | items as uncached |\n"
          "|---|---|---|---|---|---|")
    for name, r in pixels.items():
        print(f"| {name} | {r['bytes_per_example'] / 2**20:.2f} | {4000 * r['bytes_per_example'] / 2**30:.1f} | {r['build']:.2f} | "
              f"{r['read']:.1f} | {r['equal']} |")


def pixels_only(args: argparse.Namespace) -> None:
    """``--pixels-only``: the pixel storage measured on its own, written into the ``pixels`` entry of ``args.out``."""
    from deltakit.tiny import save_tiny

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = make_data(tmp / "data", args.examples)
        processor = published_processor(save_tiny("qwen2_5_vl", tmp / "model"))
        pixels = pixel_storage(data, processor, args.rounds, tmp)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["pixels"] = {"date": datetime.date.today().isoformat(), "examples": args.examples, "rounds": args.rounds, **pixels}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_pixels(pixels, args.examples)


if __name__ == "__main__":
    main()
