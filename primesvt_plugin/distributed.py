"""PrimeSVT on ``torch.distributed``: the parts a run needs when ``torchrun`` starts it.

``torchrun --nproc_per_node N -m primesvt_plugin run RECIPE`` starts N processes; each
calls ``init_from_environment()``, which joins the process group torchrun describes in
the environment (gloo on CPU, nccl on GPU). Evaluations are data-parallel: each rank
scores its shard of the validation split and the correct/total counts are summed with
``all_reduce``, so every rank gets the same score, takes the same decisions, and ends
with the same plan (checked: ``same_on_every_rank``). Only rank 0 writes files.

Outside torchrun every function here is a no-op or the single-process answer, so the
same code runs both ways.
"""
from __future__ import annotations

import datetime
import math
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .errors import RunFailed
from .pruning.spiking import model_device


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes outputs and prints."""
    return rank() == 0


def init_from_environment(timeout_s: float = 1800.0) -> bool:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Returns whether this process is part of a multi-process run. The backend is nccl
    when this rank has a GPU, gloo otherwise; on GPUs each rank takes ``LOCAL_RANK``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(loader: DataLoader) -> DataLoader:
    """The part of ``loader``'s dataset this rank scores: every ``world_size``-th sample from ``rank``.

    Together the shards cover the dataset exactly once, whatever its length.
    """
    if not active():
        return loader
    indices = range(rank(), len(loader.dataset), world_size())
    return DataLoader(Subset(loader.dataset, indices), batch_size=loader.batch_size, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn)


def all_sum(*values: int | float) -> list[float]:
    """``values`` summed over every rank (float64, so integer counts stay exact)."""
    if not active():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast(value: Any, source: int = 0) -> Any:
    """``value`` as rank ``source`` has it, on every rank (any picklable object)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def same_on_every_rank(value: Any, what: str) -> None:
    """Raise ``RunFailed`` naming the ranks whose ``value`` differs from rank 0's."""
    if not active():
        return
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    differing = [r for r, v in enumerate(gathered) if v != gathered[0]]
    if differing:
        raise RunFailed(f"{what} differs between rank 0 and rank(s) {differing}: the ranks must see the same data "
                        "and the same model (same recipe, seed and files)")


def prefix() -> str:
    """``"rank N: "`` under torchrun (so a failing process names itself), else ``""``."""
    return f"rank {os.environ['RANK']}: " if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1" else ""


# What gloo / NCCL / the c10d store say when the process at the other end of a connection is gone
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crashing")


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is this rank noticing that another process of the run stopped (under torchrun)."""
    if not prefix():
        return False
    text = str(error)
    return isinstance(error, dist.DistError) or any(sign in text for sign in PEER_LOST)


def mean_over_ranks(value: float) -> float:
    """``value`` averaged over the ranks (e.g. an epoch's loss, each rank's on its shard)."""
    return all_sum(value)[0] / world_size()


def data_parallel(model: nn.Module, loader: DataLoader, seed: int):
    """``(loader, sampler, model to train)`` for training under torchrun: the loader draws this
    rank's shard through a ``DistributedSampler`` (call ``sampler.set_epoch`` each epoch) and the
    model is wrapped in ``DistributedDataParallel``. Outside torchrun: ``(loader, None, model)``.

    ``loader.batch_size`` stays the global batch: each rank draws its share of it, so an epoch
    takes as many optimizer steps, on batches as large, as in one process."""
    if not active():
        return loader, None, model
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    sharded = DataLoader(loader.dataset, batch_size=math.ceil(loader.batch_size / world_size()), sampler=sampler,
                         num_workers=loader.num_workers, collate_fn=loader.collate_fn)
    device = model_device(model)
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return sharded, sampler, wrapped
