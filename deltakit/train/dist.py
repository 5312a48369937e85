"""Process-group setup and model wrapping for single-process, DDP and FSDP2 training.

``torchrun --nproc-per-node N -m deltakit finetune ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:func:`setup` joins that group (NCCL on GPU, gloo on CPU). Everything else here is a small uniform
interface over the three cases, so the training loop has no ``if ddp``/``if fsdp`` branches.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from deltakit.errors import DeltakitError

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """This process's place in the run: rank, world size, device, strategy (``none``, ``ddp``, ``fsdp``)."""

    rank: int
    world_size: int
    device: torch.device
    strategy: str
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum ``value`` over all processes (itself when alone); returns a new tensor."""
        value = value.clone()
        if self.world_size > 1:
            dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if :func:`setup` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(strategy: str = "auto") -> DistEnv:
    """Join the torchrun process group (when ``WORLD_SIZE`` > 1) and pick the device and strategy.

    ``auto`` is DDP with several processes and plain training with one; ``fsdp`` shards with
    FSDP2 ``fully_shard`` (also valid with one process).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    owns = False
    if (world > 1 or strategy in ("ddp", "fsdp")) and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise DeltakitError(f"--strategy {strategy} needs a process group: launch with torchrun --nproc-per-node N -m deltakit finetune ...")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    resolved = {"auto": "ddp" if world > 1 else "none"}.get(strategy, strategy)
    if resolved == "none" and world > 1:
        raise DeltakitError(f"--strategy none with {world} processes would train {world} unsynchronised copies; use ddp or fsdp")
    if rank != 0:
        logging.getLogger("deltakit").setLevel(logging.WARNING)
    return DistEnv(rank, world, device, resolved, owns)


def wrap(model: torch.nn.Module, env: DistEnv, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Put ``model`` on the device and wrap it for ``env.strategy``.

    FSDP2 shards, as its own unit, every trainable module whose class is in the model's
    ``_no_split_modules`` (the decoder layers), then the root, which takes everything else. Frozen blocks
    (the vision tower) stay in the root unit on purpose: a rank whose batch has no image skips the vision
    tower, and a separately sharded block would then miss its all-gather and hang the others; the root
    unit is gathered by every rank each step. ``param_dtype`` (bf16 on GPU) sets the mixed-precision
    policy, with gradients reduced in float32. Parameter names are unchanged by FSDP2; DDP adds ``module.``.
    """
    if env.strategy == "fsdp":
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        mesh = dist.device_mesh.init_device_mesh(env.device.type, (env.world_size,))
        for module in model.modules():
            if type(module).__name__ in blocks and any(p.requires_grad for p in module.parameters()):
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    model.to(env.device)
    if env.strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across processes in this backward only when ``enabled`` (the last micro-batch of a step)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU in rank 0 (gathered from shards under FSDP2); empty elsewhere."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
