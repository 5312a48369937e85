"""Shape-faithful random checkpoints from real ``config.json`` files, for benchmarks at the paper's sizes.

:func:`write_checkpoint` writes a folder laid out as transformers 5 saves the model of a config:
published key names and shapes, bf16, ``model-0000i-of-0000n.safetensors`` shards under a size cap
plus ``model.safetensors.index.json``, and ``config.json``, with seeded random weights.
:func:`write_partner` writes a second model, under its own family's key names, whose text tower is the
first one's plus a known perturbation (``W + noise * rms(W) * N(0, 1)`` per tensor, so every text tensor
has cosine ``1 / sqrt(1 + noise**2)`` with its counterpart; :func:`noise_for_cosine` inverts that).

Key names and shapes come from transformers itself, never from a hand-written table: the model class
named by ``config["architectures"][0]`` is built on the meta device, and its state dict goes through
the two steps ``save_pretrained`` applies to it (drop tied weights, revert the load-time key renamings).
Tensors are generated and written a row chunk at a time by a few threads reusing their buffers, so memory
stays at a few chunks whatever the model size.
:func:`shrink` makes small models from one config with the same key names (tests, quick runs).

    python analyses/shaped.py Qwen__Qwen2.5-VL-7B-Instruct OUT \\
        [--partner deepseek-ai__DeepSeek-R1-Distill-Qwen-7B OUT2 --noise 1.0] [--layers N | --tiny]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: E402
from transformers.core_model_loading import revert_weight_conversion  # noqa: E402
from transformers.modeling_utils import remove_tied_weights_from_state_dict  # noqa: E402

from deltakit.families import classify_key, detect_family  # noqa: E402
from deltakit.io.checkpoint import Checkpoint  # noqa: E402
from deltakit.io.writer import ShardedWriter, TensorSpec, atomic_output_dir  # noqa: E402
from deltakit.model import open_model  # noqa: E402
from deltakit.progress import ProgressFn, no_progress  # noqa: E402

CONFIG_DIRS = (ROOT / "tests" / "data" / "model-configs", Path("/work/shared/model-configs"))
SHARD_BYTES = 5 * 10**9  # the published Qwen/DeepSeek repos cap shards at ~4-5 GB (transformers' old "5GB")
CHUNK = 1 << 24  # elements generated at a time (64 MB of float32)
WORKERS = min(4, os.cpu_count() or 1)
PUBLISHED_TRANSPOSED_EXPERTS = ("qwen3_vl_moe",)
"""Families whose published checkpoints store fused experts transposed (see :func:`deltakit.families.fused_layout`)."""
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2, vision_hidden=32, vision_heads=2)


# -- configs and plans -------------------------------------------------------------------------------
def load_config(source: str | os.PathLike | dict) -> dict:
    """A config dict from a dict, a ``config.json`` path, a model folder, or a name under :data:`CONFIG_DIRS`."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    candidates = [path, path / "config.json"] + [d / str(source) / "config.json" for d in CONFIG_DIRS]
    for p in candidates:
        if p.is_file():
            return json.loads(p.read_text())
    raise FileNotFoundError(f"{source}: no config.json there nor under {', '.join(map(str, CONFIG_DIRS))}")


def hf_config(config: dict | transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The transformers config object of a config dict (the class its ``model_type`` names)."""
    if isinstance(config, transformers.PretrainedConfig):
        return config
    return transformers.AutoConfig.for_model(**config)


def meta_model(config: dict | transformers.PretrainedConfig) -> torch.nn.Module:
    """The model class named by ``architectures[0]``, built on the meta device (no memory, no init cost)."""
    cfg = hf_config(config)
    arch = (cfg.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"config names no transformers architecture ({arch!r}); trust_remote_code is never used")
    with torch.device("meta"):
        return cls(cfg)


def plan(config: str | os.PathLike | dict, dtype: torch.dtype = torch.bfloat16, layout: str = "published") -> list[TensorSpec]:
    """Every tensor transformers 5 writes for ``config``: disk key, dtype, shape, in ``save_pretrained`` order.

    Floating tensors get ``dtype``; others keep theirs; tied weights are left out as transformers does.
    ``layout="published"`` names keys as transformers 5 re-saves a model loaded from its published
    checkpoint (every load-time renaming of the class reverted, prefix changes included: LLaVA-Next's
    ``vision_tower.vision_model.*``); ``"fresh"`` as it saves a model built from the config, which
    drops prefix changes (``vision_tower.*``). The two agree for the Qwen, Mistral, Llama and Idefics families.
    """
    if layout not in ("published", "fresh"):
        raise ValueError(f"layout must be 'published' or 'fresh', not {layout!r}")
    model = meta_model(load_config(config))
    if layout == "published":
        # What from_pretrained records after loading a published checkpoint (legacy renamings excluded).
        model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state = revert_weight_conversion(model, state)
    specs = [TensorSpec(k, dtype if t.is_floating_point() else t.dtype, tuple(t.shape)) for k, t in state.items()]
    if layout == "published" and model.config.model_type in PUBLISHED_TRANSPOSED_EXPERTS:
        # transformers transposes these on load only when the shape differs from the model's (check_dims), so
        # reverting on the meta device cannot tell; the published checkpoints hold [E, H, 2I] / [E, I, H].
        specs = [TensorSpec(s.name, s.dtype, (s.shape[0], s.shape[2], s.shape[1])) if ".mlp.experts." in s.name else s
                 for s in specs]
    return specs


def shrink(config: dict, layers: int | None = None, hidden: int | None = None, heads: int | None = None,
           kv_heads: int | None = None, intermediate: int | None = None, vocab: int | None = None,
           vision_layers: int | None = None, vision_hidden: int | None = None, vision_heads: int | None = None) -> dict:
    """A smaller config of the same architecture (same key names); every size left as None is kept.

    Text sizes apply to the text tower (top level or ``text_config``), vision sizes to ``vision_config``
    (and Idefics2's perceiver); dependent fields (Qwen-VL's mrope sections and full-attention blocks,
    ``layer_types``, ``out_hidden_size``) follow. Returns transformers' full dict of the new config.
    """
    cfg = copy.deepcopy(hf_config(config))
    text = cfg.get_text_config()
    old_head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    for attr, value in (("num_hidden_layers", layers), ("hidden_size", hidden), ("num_attention_heads", heads),
                        ("num_key_value_heads", kv_heads), ("intermediate_size", intermediate), ("vocab_size", vocab)):
        if value is not None:
            setattr(text, attr, value)
    if (hidden or heads) and getattr(text, "head_dim", None) is not None:
        text.head_dim = text.hidden_size // text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if layers is not None:
        if getattr(text, "max_window_layers", None) is not None:
            text.max_window_layers = min(text.max_window_layers, layers)
        if getattr(text, "layer_types", None):
            text.layer_types = (list(text.layer_types) * layers)[:layers]
        _clamp_indices(text, "cross_attention_layers", layers)  # Mllama
    if vocab is not None:
        for c in (cfg, text):
            if isinstance(getattr(c, "pad_token_id", None), int) and c.pad_token_id >= vocab:
                c.pad_token_id = None
    for rope in (getattr(text, "rope_parameters", None), getattr(text, "rope_scaling", None)):
        if isinstance(rope, dict) and "mrope_section" in rope and head_dim != old_head_dim:
            sec = rope["mrope_section"]
            new = [max(1, round(s * head_dim / 2 / sum(sec))) for s in sec[:-1]]
            rope["mrope_section"] = new + [head_dim // 2 - sum(new)]
    vision = getattr(cfg, "vision_config", None)
    if vision is not None:
        if hasattr(vision, "embed_dim"):  # Qwen2-VL: width is embed_dim, hidden_size is the merger's output
            vision.hidden_size = text.hidden_size
            width = "embed_dim"
        else:
            width = "hidden_size"
        depth = "depth" if hasattr(vision, "depth") else "num_hidden_layers"
        if vision_layers is not None:
            setattr(vision, depth, vision_layers)
        if vision_hidden is not None:
            setattr(vision, width, vision_hidden)
            if hasattr(vision, "intermediate_size"):
                vision.intermediate_size = 2 * vision_hidden
            if hasattr(vision, "projection_dim"):
                vision.projection_dim = vision_hidden
        if vision_heads is not None:
            setattr(vision, "num_heads" if hasattr(vision, "num_heads") else "num_attention_heads", vision_heads)
        if hasattr(vision, "out_hidden_size"):
            vision.out_hidden_size = text.hidden_size
        n = getattr(vision, depth)
        _clamp_indices(vision, "fullatt_block_indexes", n)
        if _clamp_indices(vision, "intermediate_layers_indices", n) and hasattr(vision, "vision_output_dim"):  # Mllama
            vision.vision_output_dim = getattr(vision, width) * (len(vision.intermediate_layers_indices) + 1)
            vision.num_global_layers = min(vision.num_global_layers, n)
    perceiver = getattr(cfg, "perceiver_config", None)
    if perceiver is not None:
        perceiver.hidden_size = text.hidden_size
        if vision_heads is not None:
            perceiver.resampler_n_heads, perceiver.num_key_value_heads = vision_heads, 1
        if vision_hidden is not None:
            perceiver.resampler_head_dim = max(4, vision_hidden // max(1, perceiver.resampler_n_heads))
        if vision_layers is not None:
            perceiver.resampler_depth = min(perceiver.resampler_depth, vision_layers)
    return cfg.to_dict()


def _clamp_indices(config: transformers.PretrainedConfig, attr: str, n: int) -> bool:
    """Keep a list of layer indices valid for ``n`` layers (each clamped to ``n - 1``); whether it exists."""
    value = getattr(config, attr, None)
    if not value:
        return False
    setattr(config, attr, sorted({min(i, n - 1) for i in value}))
    return True


# -- random values -----------------------------------------------------------------------------------
def _generator(seed: int, key: str, row: int = 0) -> torch.Generator:
    """The generator of the chunk of tensor ``key`` starting at ``row``: values depend on neither plan
    order, sharding nor thread count."""
    digest = hashlib.blake2b(f"{seed}:{key}:{row}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _is_norm(key: str, shape: tuple[int, ...]) -> bool:
    last = key.rsplit(".", 2)[-2] if key.count(".") else key
    return len(shape) == 1 and key.endswith(".weight") and ("norm" in last or last.startswith("ln"))


def _row_ranges(shape: tuple[int, ...], start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
    """Row ranges ``[a, b)`` of dim 0 covering ``[start, stop)``, each of at most :data:`CHUNK` elements."""
    rows = shape[0] if shape else 1
    stop = rows if stop is None else stop
    per_row = max(1, math.prod(shape[1:])) if shape else 1
    step = max(1, CHUNK // per_row)
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


class _Buffers(threading.local):
    """Per-thread scratch tensors, reused chunk after chunk (fresh 64 MB allocations cost page faults)."""

    def __init__(self) -> None:
        self.flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, slot: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """This thread's buffer ``slot`` as a tensor of ``shape`` (contents undefined)."""
        n = math.prod(shape)
        flat = self.flat.get((slot, dtype))
        if flat is None or flat.numel() < n:
            flat = self.flat[(slot, dtype)] = torch.empty(max(n, CHUNK), dtype=dtype)
        return flat[:n].view(shape)


_BUFFERS = _Buffers()
Job = Callable[[], int]


def _rms(ckpt: Checkpoint, key: str) -> float:
    """Root mean square of tensor ``key``, chunk by chunk (float32 squares, cascade sums: torch's float32
    ``norm`` of tens of millions of elements is off by ~1e-3)."""
    w, sq = ckpt.get(key), 0.0
    for a, b in _row_ranges(tuple(w.shape)):
        chunk = w[a:b] if w.dim() else w
        sq += float(_BUFFERS.get("x", torch.float32, tuple(chunk.shape)).copy_(chunk).square_().sum())
    return math.sqrt(sq / max(1, w.numel()))


def _random_job(writer: ShardedWriter, spec: TensorSpec, a: int, b: int, seed: int, std: float) -> Job:
    """Rows ``[a, b)`` of a fresh random tensor: ``1 + std * N`` for norm weights, ``std * N`` otherwise."""
    def job() -> int:
        shape = (b - a, *spec.shape[1:]) if spec.shape else ()
        out = _BUFFERS.get("out", spec.dtype, shape)
        if spec.dtype.is_floating_point:
            x = _BUFFERS.get("x", torch.float32, shape).normal_(0.0, std, generator=_generator(seed, spec.name, a))
            out.copy_(x.add_(1.0) if _is_norm(spec.name, spec.shape) else x)
        else:
            out.zero_()
        writer.write_rows(spec.name, a, out)
        return out.numel() * out.element_size()
    return job


def _perturb_job(writer: ShardedWriter, spec: TensorSpec, a: int, b: int, seed: int, ckpt: Checkpoint, key: str,
                 scale: float) -> Job:
    """Rows ``[a, b)`` of tensor ``key`` of ``ckpt`` plus ``scale * N(0, 1)``."""
    def job() -> int:
        src = ckpt.rows(key, a, b) if spec.shape else ckpt.get(key)
        x = _BUFFERS.get("x", torch.float32, tuple(src.shape))
        x.copy_(src)
        ckpt.release(key, a, b)
        x.add_(_BUFFERS.get("z", torch.float32, x.shape).normal_(0.0, scale, generator=_generator(seed, spec.name, a)))
        out = _BUFFERS.get("out", spec.dtype, x.shape)
        writer.write_rows(spec.name, a, out.copy_(x))
        return out.numel() * out.element_size()
    return job


def _write_folder(config: dict, out: str | os.PathLike, specs: list[TensorSpec],
                  jobs: Callable[[ShardedWriter], Iterator[Job]], max_shard_bytes: int, workers: int,
                  progress: ProgressFn | None, overwrite: bool, what: str) -> Path:
    """Write ``config.json`` and the shards of ``specs`` into ``out`` (atomically), running ``jobs(writer)``
    on ``workers`` threads (torch and ``pwrite`` release the GIL), at most ``2 * workers`` queued."""
    progress = progress or no_progress
    progress(0, total=sum(s.nbytes for s in specs), description=what)
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        with ShardedWriter(tmp, specs, max_shard_bytes) as writer, ThreadPoolExecutor(workers) as pool:
            pending: deque[Future] = deque()
            try:
                for job in jobs(writer):
                    pending.append(pool.submit(job))
                    while len(pending) > 2 * workers or (pending and pending[0].done()):
                        progress(pending.popleft().result())
                while pending:
                    progress(pending.popleft().result())
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    return Path(out)


def write_checkpoint(config: str | os.PathLike | dict, out: str | os.PathLike, seed: int = 0, std: float = 0.02,
                     max_shard_bytes: int = SHARD_BYTES, dtype: torch.dtype = torch.bfloat16, workers: int = WORKERS,
                     progress: ProgressFn | None = None, overwrite: bool = False) -> Path:
    """Write a random checkpoint of ``config`` into folder ``out`` (atomically); returns ``out``.

    Values: ``std * N(0, 1)`` (norm weights ``1 + std * N``), from generators seeded by ``seed``, the key
    and the row chunk, so the output does not depend on ``workers``.
    """
    config = load_config(config)
    specs = plan(config, dtype)

    def jobs(writer: ShardedWriter) -> Iterator[Job]:
        for spec in specs:
            for a, b in _row_ranges(spec.shape):
                yield _random_job(writer, spec, a, b, seed, std)

    return _write_folder(config, out, specs, jobs, max_shard_bytes, workers, progress, overwrite, f"random {Path(out).name}")


def noise_for_cosine(cosine: float) -> float:
    """The ``noise`` of :func:`write_partner` that gives text tensors this expected cosine with the first model."""
    return math.sqrt(1.0 / cosine**2 - 1.0)


def write_partner(first: str | os.PathLike, config: str | os.PathLike | dict, out: str | os.PathLike, noise: float = 1.0,
                  seed: int = 1, std: float = 0.02, max_shard_bytes: int = SHARD_BYTES, dtype: torch.dtype = torch.bfloat16,
                  workers: int = WORKERS, progress: ProgressFn | None = None, overwrite: bool = False) -> Path:
    """Write a model of ``config`` whose text tower is ``first``'s plus noise, under ``config``'s own key names.

    Every text tensor whose canonical name (``deltakit.families``) exists in ``first`` becomes
    ``W + noise * rms(W) * N(0, 1)``, ``rms`` taken over the whole tensor of ``first``: the expected
    cosine is ``1 / sqrt(1 + noise**2)`` and ``|delta| / |W| ~ noise`` (0.707 for noise 1: the paper's far
    pair). Rounding the result to bf16 adds a relative ~0.0017 of its own, which matters for noise below
    ~0.01 (a measured difference is then ``sqrt(noise**2 + 0.0017**2)``). A tied ``lm_head`` on either
    side is followed to the embedding. Rows past the shared vocabulary, text tensors ``first`` lacks and
    all non-text tensors are fresh random values as in :func:`write_checkpoint`. Trailing shapes must
    agree (a :class:`ValueError` otherwise).
    """
    config = load_config(config)
    specs = plan(config, dtype)
    family = detect_family(config, [s.name for s in specs])
    src = open_model(first)
    ckpt = src.ckpt

    def counterpart(spec: TensorSpec) -> str | None:
        info = classify_key(spec.name, family)
        if info.role != "text" or (info.canonical not in src.text and not (src.tied and info.kind == "lm_head")):
            return None
        if info.kind == "experts" or src.resolve(info.canonical).expert is not None:
            raise ValueError(f"{spec.name}: partners of MoE expert tensors are not generated (fused and per-expert layouts differ)")
        key = src.resolve(info.canonical).key
        shape = ckpt.meta(key).shape
        if shape[1:] != spec.shape[1:] or (shape[:1] != spec.shape[:1] and info.kind not in ("embed", "lm_head")):
            raise ValueError(f"{spec.name}: shape {spec.shape} does not match {key} {shape} of {first}")
        return key

    def jobs(writer: ShardedWriter) -> Iterator[Job]:
        for spec in specs:
            key, shared = counterpart(spec), 0
            if key is not None:
                meta = ckpt.meta(key)
                rms = _rms(ckpt, key)
                shared = min(meta.shape[0], spec.shape[0]) if spec.shape else 1
                for a, b in _row_ranges(spec.shape, 0, shared):
                    yield _perturb_job(writer, spec, a, b, seed, ckpt, key, noise * rms)
            for a, b in _row_ranges(spec.shape, shared):
                yield _random_job(writer, spec, a, b, seed, std)

    try:
        return _write_folder(config, out, specs, jobs, max_shard_bytes, workers, progress, overwrite,
                             f"partner {Path(out).name}")
    finally:
        ckpt.close()


# -- command line ------------------------------------------------------------------------------------
def _cli_config(name: str, args: argparse.Namespace) -> dict:
    config = load_config(name)
    if args.tiny:
        return shrink(config, **TINY)
    if args.layers:
        return shrink(config, layers=args.layers, vision_layers=args.layers)
    return config


def _report(what: str, folder: Path, seconds: float) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    gb = index["metadata"]["total_size"] / 1e9
    shards = len(set(index["weight_map"].values()))
    print(f"{what}: {folder}  {len(index['weight_map'])} tensors, {shards} shards, {gb:.2f} GB in {seconds:.1f} s "
          f"({gb / seconds:.2f} GB/s)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="model-config name (e.g. Qwen__Qwen2.5-VL-7B-Instruct), config.json or folder")
    p.add_argument("out", type=Path)
    p.add_argument("--partner", nargs=2, metavar=("CONFIG", "OUT"), help="also write a partner of this config")
    p.add_argument("--noise", type=float, default=1.0, help="partner perturbation (1.0: text cosine ~0.707)")
    p.add_argument("--cosine", type=float, help="aim the partner at this text cosine instead of giving --noise")
    p.add_argument("--layers", type=int, help="shrink both models to N text (and vision) layers, widths kept")
    p.add_argument("--tiny", action="store_true", help="shrink both models to tiny widths and 2 layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1e9)
    p.add_argument("--workers", type=int, default=WORKERS, help="generator threads (the output does not depend on it)")
    p.add_argument("--force", action="store_true", help="replace existing output folders")
    args = p.parse_args(argv)
    shard = int(args.shard_gb * 1e9)
    t = time.perf_counter()
    write_checkpoint(_cli_config(args.config, args), args.out, seed=args.seed, max_shard_bytes=shard, workers=args.workers,
                     overwrite=args.force)
    _report("first", args.out, time.perf_counter() - t)
    if args.partner:
        noise = noise_for_cosine(args.cosine) if args.cosine else args.noise
        t = time.perf_counter()
        out2 = Path(args.partner[1])
        write_partner(args.out, _cli_config(args.partner[0], args), out2, noise=noise, seed=args.seed + 1,
                      max_shard_bytes=shard, workers=args.workers, overwrite=args.force)
        _report(f"partner (noise {noise:.3f})", out2, time.perf_counter() - t)


if __name__ == "__main__":
    main()
