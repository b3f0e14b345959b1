"""``trainer.strategy: fsdp``: the model sharded with FSDP2 (``fully_shard``), and its checkpoints.

Which modules are sharded on their own (FSDP2's units, gathered one at a time in forward and backward):
the members of every container -- ``nn.Sequential``, ``nn.ModuleList`` -- whose members are two or
more modules of one class holding parameters: timm's blocks and stages (ResNet's ``layerN`` blocks,
ViT's ``blocks``, ConvNeXt's stages and their blocks), torchvision's layers' blocks, this project's
small nets' stages. Nested units are sharded innermost first; the root last takes what is left (stem,
head). Under bf16, FSDP2's ``MixedPrecisionPolicy`` gathers parameters in bf16 and reduces gradients
in float32; every normalisation layer is a unit of its own kept in float32 (BatchNorm's statistics and
affine in full precision, as autocast keeps them).

Checkpoints: the model's and optimizer's shards go to a ``torch.distributed.checkpoint`` folder beside
``last.pt``/``best.pt`` (``<name>-e<epoch>.dcp``: each process writes its own shards), and ``last.pt``
keeps the rest (recipe, scheduler, RNG, epoch) and the folder's name. A folder is written before the
``.pt`` that names it and removed only once no ``.pt`` names it, so a kill at any point leaves a
checkpoint and its folder together. DCP reshards on load: a checkpoint of N processes loads on M, with
FSDP or without (``--allow-changes``: the world size changed).
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..module_kinds import NORM_TYPES

DCP_SUFFIX = ".dcp"


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded on their own (the module docstring's rule), innermost first."""
    units: list[tuple[int, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        members = [m for m in module.children() if any(True for _ in m.parameters())]
        if len(members) >= 2 and len({type(m) for m in members}) == 1:
            depth = name.count(".") + 1 if name else 0
            units += [(depth + 1, m) for m in members]
    units.sort(key=lambda pair: -pair[0])  # children before the containers that hold them
    return [m for _, m in units if m is not model]


def shard_model(model: nn.Module, precision: str, device: torch.device | None = None) -> nn.Module:
    """``fully_shard`` the units, (under bf16) every norm layer in float32, then the root; in place.
    The shards go to ``device`` (FSDP2 moves each process's shards to its mesh's device), so the whole
    model never sits on one GPU."""
    mesh = init_device_mesh(device.type if device is not None else "cpu", (dist.get_world_size(),))
    bf16 = precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mesh": mesh, **({"mp_policy": policy} if policy is not None else {})}
    if policy is not None:
        full = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for module in model.modules():
            if isinstance(module, NORM_TYPES) and any(True for _ in module.parameters(recurse=False)):
                fully_shard(module, mesh=mesh, mp_policy=full)
    for unit in shard_units(model):
        if not isinstance(unit, FSDPModule):
            fully_shard(unit, **options)
    fully_shard(model, **options)
    if device is not None:  # buffers of modules FSDP does not manage
        model.to(device)
    return model


def agree_on_buffers(model: nn.Module) -> None:
    """Make the buffers FSDP leaves replicated the same on every process: BatchNorm's running
    statistics (each process updates them from its own rows) averaged, any other buffer rank 0's.
    Before an evaluation and a checkpoint: DCP saves one copy of an unsharded tensor, so a resumed run
    must find on every process what the uninterrupted one had (DDP gets there by broadcasting rank 0's
    at every training forward)."""
    averaged = set()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for stat in (module.running_mean, module.running_var):
                if stat is not None:
                    dist.all_reduce(stat)
                    stat.div_(dist.get_world_size())
                    averaged.add(id(stat))
    for buffer in model.buffers():
        if id(buffer) not in averaged:
            dist.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------- checkpoints


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the model and the optimizer state to ``folder`` (collective)."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=folder)


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load ``folder`` into ``model`` (and ``optimizer``), resharded to how they are now: FSDP on any
    number of processes, or a plain model in one process."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def sharded_folder(run_dir: Path, name: str, epoch: int) -> Path:
    return run_dir / f"{name}-e{epoch}{DCP_SUFFIX}"


def remove_unreferenced(run_dir: Path, referenced: set[str]) -> None:
    """Remove the DCP folders no checkpoint names any more (rank 0, after the ``.pt`` files are written)."""
    for folder in run_dir.glob(f"*{DCP_SUFFIX}"):
        if folder.is_dir() and folder.name not in referenced:
            shutil.rmtree(folder, ignore_errors=True)


def shard_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds of the parameters, their gradients and the optimizer state (local
    shards under FSDP)."""
    sizes: dict[str, int] = defaultdict(int)
    for p in model.parameters():
        for key, t in (("parameters", p), ("gradients", p.grad)):
            if t is not None:
                local = t.to_local() if hasattr(t, "to_local") else t
                sizes[key] += local.numel() * local.element_size()
    for entry in optimizer.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                sizes["optimizer_state"] += local.numel() * local.element_size()
    return dict(sizes)
