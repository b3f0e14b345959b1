"""The few torch.distributed helpers the optimizer and the trainer share."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without distributed
    DTensor = ()  # type: ignore[assignment,misc]


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


@torch.no_grad()
def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place across all processes: one all-reduce per (device, dtype)
    bucket, not one per tensor. A no-op in a single process. DTensors (FSDP2 shards) are left as they
    are: their values come from FSDP's reduce-scatter, already averaged over processes
    (``sgdph_tools/curvature/sharded.py``)."""
    n = world_size()
    tensors = [t for t in tensors if not isinstance(t, DTensor)]
    if n == 1 or not tensors:
        return
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        buckets[(t.device, t.dtype)].append(t)
    for bucket in buckets.values():
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat.div_(n)
        for t, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(reduced)


@torch.no_grad()
def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place across all processes (a no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on every process (one all-reduce; ``flag`` itself in a single process):
    for decisions that must agree where each process sees only its shard."""
    if world_size() == 1:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0
