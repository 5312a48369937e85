"""Shared by the training tests: tokenised examples with and without an image, a collate, a dict-backed prior.

The examples are what deltakit.data produces for the tiny Qwen2.5-VL (ids from deltakit.tiny.SPECIAL):
a prompt (masked with -100), for some an image of 2x2 patches (one merged image token), and an
assistant answer (trained). They let the loop be tested apart from the data pipeline.
"""

import os
import socket
import sys

import torch
import torch.multiprocessing as mp

from deltakit.tiny import SPECIAL

PAD = SPECIAL["endoftext"]


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 400, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen).tolist()
        answer = torch.randint(0, 400, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        image = [SPECIAL["vision_start"], SPECIAL["image"], SPECIAL["vision_end"]] if i % 2 == 0 else []
        head = [SPECIAL["im_start"], *image, *prompt, SPECIAL["im_end"], SPECIAL["im_start"]]
        ids = head + answer + [SPECIAL["im_end"]]
        labels = [-100] * len(head) + answer + [SPECIAL["im_end"]]
        ex = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if image:
            ex["pixel_values"] = torch.randn(4, 3 * 2 * 14 * 14, generator=gen)
            ex["image_grid_thw"] = torch.tensor([[1, 2, 2]])
        out.append(ex)
    return out


def collate(batch: list[dict], pad_id: int = PAD) -> dict:
    """Right-pad to the longest example; images concatenated in order."""
    length = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), length), pad_id)
    labels = torch.full((len(batch), length), -100)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = b["input_ids"], b["labels"], 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    images = [b for b in batch if "pixel_values" in b]
    if images:
        out["pixel_values"] = torch.cat([b["pixel_values"] for b in images])
        out["image_grid_thw"] = torch.cat([b["image_grid_thw"] for b in images])
    return out


class DictPrior:
    """A prior held in a dict of tensors (the deltakit.drift.PriorSource protocol)."""

    def __init__(self, tensors: dict, alphas: dict | None = None):
        self.tensors = tensors
        self.names = list(tensors)
        self.alphas = alphas or {}

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name, dtype=None, device=None):
        return self.tensors[name].to(device=device or "cpu", dtype=dtype or self.tensors[name].dtype)

    def alpha(self, name):
        return self.alphas.get(name, 1.0)


def free_port() -> int:
    """A free TCP port on localhost for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args, nprocs: int = 2) -> None:
    """``mp.spawn(worker, args)`` on ``nprocs`` processes, each leaving by ``os._exit(0)`` once ``worker`` returns.

    A gloo worker thread can still be releasing the tensors of the last collective when the process ends. If it does
    that during interpreter finalization it cannot take the GIL, and the process aborts (``terminate called without an
    active exception``: about 1 run in 20 of test_distributed on 2 busy cores, the thread's core dump in
    ``ProcessGroupGloo::AsyncWork::~AsyncWork``). The test workers have written all they return, so they skip
    finalization; an exception still reaches ``mp.spawn`` as before.
    """
    mp.spawn(_exit_after, args=(worker, args), nprocs=nprocs, join=True)


def _exit_after(rank: int, worker, args: tuple) -> None:
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
