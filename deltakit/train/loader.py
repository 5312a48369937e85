"""From examples to the micro-batches of each optimizer step: order, length grouping, packing, the DataLoader.

The examples of step ``s`` are a pure function of the seed, the global batch size, ``s`` and (with
``group_by_length``) the examples' lengths, never of the split into processes and micro-batches, so a
resumed run takes the same examples in the same steps and any ``batch_size x grad_accum x processes``
split gives the same gradient (:meth:`StepOrder.step`). :class:`MicroBatchSampler` hands this process's
micro-batches from a start step to a :class:`torch.utils.data.DataLoader` (workers, pinned memory,
prefetch), :func:`make_loader`; :func:`steps` groups them back into steps on the device.

Packing (:func:`pack`, ``packing: true``): the examples of a micro-batch are concatenated into one row,
with no padding. Each keeps its own positions: for Qwen2-VL / Qwen2.5-VL the 3-D multimodal rotary
positions transformers' ``get_rope_index`` gives the example alone, plus text positions restarting at 0,
passed as ``position_ids`` of shape ``[4, 1, T]`` without an attention mask, from which transformers builds
the block-diagonal causal mask (``find_packed_sequence_indices``), so no token attends across examples
(:func:`packed_inputs`). The first label of each example is ignored, so no token is trained to predict
the next example's start. The loss equals the padded batch's up to float rounding (tested).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from deltakit.errors import DeltakitError

IGNORE = -100
MEGABATCH = 50
"""Length grouping sorts runs of this many global batches by length (as Hugging Face's ``group_by_length``)."""
PACKABLE = ("qwen2_vl", "qwen2_5_vl")
"""Model types whose forward takes packed ``[4, 1, T]`` position ids and masks each example off (see the module docstring)."""
_PACK_KEYS = ("seq_lengths", "seq_images")


def lengths_of(dataset: Sequence[dict]) -> list[int]:
    """Token length of every example: the dataset's ``lengths`` (a cache knows them) or read from each item."""
    known = getattr(dataset, "lengths", None)
    return list(known) if known is not None else [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


class StepOrder:
    """Which examples form each global batch (step) of an epoch.

    Epoch ``e`` is the permutation of ``torch.randperm(n)`` seeded by ``seed + e``; its first
    ``steps_per_epoch * global_batch`` examples form the steps in order (the rest of an epoch is dropped).
    With ``lengths`` (length grouping) those examples are cut into runs of :data:`MEGABATCH` global
    batches, each run sorted by length (longest first, ties in permutation order) and cut into global
    batches, and the epoch's batches are shuffled by a generator seeded by ``seed + e`` (its next draw);
    each batch's examples are then ordered longest first, so micro-batches hold similar lengths.
    """

    def __init__(self, examples: int, global_batch: int, steps_per_epoch: int, seed: int, lengths: Sequence[int] | None = None):
        self.examples, self.global_batch, self.steps_per_epoch, self.seed = examples, global_batch, steps_per_epoch, seed
        self.lengths = list(lengths) if lengths is not None else None

    @functools.lru_cache(maxsize=2)
    def epoch(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.examples, generator=gen).tolist()[:self.steps_per_epoch * self.global_batch]
        g = self.global_batch
        if self.lengths is None:
            return [order[i:i + g] for i in range(0, len(order), g)]
        batches = []
        for start in range(0, len(order), MEGABATCH * g):
            run = sorted(order[start:start + MEGABATCH * g], key=lambda i: -self.lengths[i])  # stable: ties keep order
            batches += [run[i:i + g] for i in range(0, len(run), g)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return [sorted(b, key=lambda i: -self.lengths[i]) for b in shuffled]

    def step(self, step: int) -> list[int]:
        """The example indices of global batch ``step`` (0-based, across epochs)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.epoch(epoch)[pos]


class MicroBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches (lists of example indices), step after step from ``start`` to ``stop``.

    Process ``r`` takes the ``r``-th contiguous slice of ``batch_size * grad_accum`` examples of each step,
    cut into ``grad_accum`` micro-batches of ``batch_size``.
    """

    def __init__(self, order: StepOrder, start: int, stop: int, rank: int, batch_size: int, grad_accum: int):
        self.order, self.start, self.stop = order, start, stop
        self.rank, self.batch_size, self.grad_accum = rank, batch_size, grad_accum

    def micro_batches(self, step: int) -> list[list[int]]:
        per_rank = self.batch_size * self.grad_accum
        mine = self.order.step(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [mine[i:i + self.batch_size] for i in range(0, per_rank, self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield from self.micro_batches(step)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.grad_accum


def default_workers(dataset: Sequence[dict], world_size: int) -> int:
    """Loader processes when ``num_workers`` is unset: none for examples already in memory (a list: nothing to
    do per item), else one per CPU core of this process's share but one (the training process), at most 4."""
    if isinstance(dataset, (list, tuple)) or in_daemon():
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(local, 1) - 1))


def in_daemon() -> bool:
    """Whether this is a daemonic multiprocessing process (a pool worker, say), which may not start loader workers."""
    import multiprocessing

    return bool(multiprocessing.current_process().daemon)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # workers collate; the training process has the cores' compute


def make_loader(dataset: Sequence[dict], sampler: MicroBatchSampler, collate: Callable[[list[dict]], dict],
                workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """A DataLoader over ``sampler``'s micro-batches: ``workers`` processes (0 = in this one), each keeping 2
    micro-batches ready; pinned host memory for a copy to the GPU that overlaps compute."""
    if workers and in_daemon():
        raise DeltakitError(f"num_workers {workers}: this process is a daemonic multiprocessing worker, which cannot start "
                        "loader processes; use num_workers 0 (the default here)")
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                       pin_memory=pin_memory, prefetch_factor=2 if workers else None,
                                       worker_init_fn=_one_thread if workers else None)


def steps(loader: torch.utils.data.DataLoader, start: int, grad_accum: int, device: torch.device,
          prepare: Callable[[dict], dict] = lambda b: b) -> Iterator[tuple[int, list[dict], float]]:
    """``(step, micro-batches on the device, seconds spent waiting for them)`` from ``start`` on."""
    it = iter(loader)
    step = start
    while True:
        waited = time.perf_counter()
        micro = []
        for _ in range(grad_accum):
            try:
                batch = next(it)
            except StopIteration:
                return
            micro.append(prepare({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}))
        yield step, micro, time.perf_counter() - waited
        step += 1


def pack(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """The examples of ``batch`` concatenated into one row (``[1, T]``, no padding, no attention mask).

    Per-token tensors are concatenated, per-image ones too (in example order); the first label of each
    example is -100; ``seq_lengths`` and ``seq_images`` (tokens and images per example) let
    :func:`packed_inputs` build the position ids. ``pad_id`` is unused (nothing is padded); it keeps the
    signature of :func:`deltakit.data.collate`.
    """
    from deltakit.data import _TOKEN_KEYS

    del pad_id
    out: dict[str, torch.Tensor] = {}
    for key in _TOKEN_KEYS:
        if any(key in b for b in batch):
            parts = [b[key] if key in b else torch.zeros(len(b["input_ids"]), dtype=next(x[key] for x in batch if key in x).dtype)
                     for b in batch]
            out[key] = torch.cat(parts)[None]
    starts = torch.tensor([0, *torch.tensor([len(b["input_ids"]) for b in batch]).cumsum(0)[:-1].tolist()])
    out["labels"][0, starts] = IGNORE
    for key in dict.fromkeys(k for b in batch for k in b if k not in _TOKEN_KEYS):
        out[key] = torch.cat([b[key] for b in batch if key in b])
    out["seq_lengths"] = torch.tensor([len(b["input_ids"]) for b in batch])
    out["seq_images"] = torch.tensor([len(b["image_grid_thw"]) if "image_grid_thw" in b else 0 for b in batch])
    return out


def check_packable(model: torch.nn.Module) -> None:
    """Refuse packing for a model whose forward is not known to keep packed examples apart."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PACKABLE:
        raise DeltakitError(f"packing is not supported for model type {model_type!r} (supported: {', '.join(PACKABLE)}, whose "
                            "forward masks packed examples off each other from their position ids); use group_by_length instead")


def packed_inputs(model: torch.nn.Module) -> Callable[[dict], dict]:
    """A function turning a :func:`pack` batch into model inputs: ``position_ids`` ``[4, 1, T]`` (text positions,
    then the 3 rotary rows of each example alone from the model's own ``get_rope_index``), pack keys removed."""
    check_packable(model)
    rope = next(m for m in model.modules() if hasattr(m, "get_rope_index")).get_rope_index

    def prepare(batch: dict) -> dict:
        if "seq_lengths" not in batch:
            return batch
        batch = dict(batch)
        lengths, images = batch.pop("seq_lengths").tolist(), batch.pop("seq_images").tolist()
        ids, types = batch["input_ids"][0], batch.get("mm_token_type_ids")
        grid = batch.get("image_grid_thw")
        rows, text, t0, g0 = [], [], 0, 0
        for n, k in zip(lengths, images):
            seg_types = types[0, t0:t0 + n][None] if types is not None else torch.zeros_like(ids[None, t0:t0 + n])
            pos, _ = rope(ids[None, t0:t0 + n], mm_token_type_ids=seg_types,
                          image_grid_thw=grid[g0:g0 + k] if k else None)
            rows.append(pos)
            text.append(torch.arange(n, device=ids.device))
            t0, g0 = t0 + n, g0 + k
        batch["position_ids"] = torch.cat([torch.cat(text)[None, None], torch.cat(rows, dim=2)], dim=0)
        return batch

    return prepare


def padding_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(real tokens, padding tokens)`` of a collated or packed batch."""
    total = batch["input_ids"].numel()
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else total
    return real, total - real
