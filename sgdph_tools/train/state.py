"""Training checkpoints: everything a run needs to continue exactly, written atomically.

The payload extends the converted-model checkpoint (model name and kwargs, conversion, state_dict),
so ``sgdph inspect`` and ``sgdph export`` read training checkpoints too, and adds the optimizer,
scheduler and GradScaler states, the RNG states, the epoch, the best accuracy and the recipe. It
holds only plain data and tensors: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..io import atomic_save
from ..surgery.checkpoint import TRAIN_FORMAT, TRAIN_VERSION, read_checkpoint
from ..version import __version__

FORMAT, VERSION = TRAIN_FORMAT, TRAIN_VERSION


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_state(
    path: Path,
    *,
    recipe: dict,
    model_spec: dict,
    conversion: dict | None,
    model,
    optimizer,
    scheduler,
    scaler,
    epoch: int,
    best_val_acc1: float,
    best_val_loss: float,
    device: torch.device,
    loss_reference: float | None = None,
    world_size: int = 1,
    sharded_state: str | None = None,
) -> Path:
    """``sharded_state``: the name of the DCP folder beside ``path`` that holds the model's and the
    optimizer's shards (``trainer.strategy: fsdp``, :mod:`.sharding`); they are then not in the file."""
    return atomic_save(
        {
            "format": FORMAT,
            "version": VERSION,
            "sgdph_tools_version": __version__,
            "recipe": recipe,
            "model": model_spec,
            "conversion": conversion,
            "state_dict": model.state_dict() if sharded_state is None else None,
            "optimizer": optimizer.state_dict() if sharded_state is None else None,
            "sharded_state": sharded_state,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(device),
            "epoch": epoch,  # completed epochs
            "best_val_acc1": best_val_acc1,  # -inf without a validation set
            "best_val_loss": best_val_loss,  # its validation loss (the tie-break); inf without one
            "loss_reference": loss_reference,  # the divergence guard's starting loss (None: not yet)
            "world_size": world_size,  # processes it trained on (resuming on another count is a change)
        },
        path,
    )


def load_training_state(path: Path) -> dict[str, Any]:
    payload = read_checkpoint(path)
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
        raise UserError(f"{path} is not a training checkpoint written by sgdph train")
    if payload.get("version", 1) > VERSION:
        raise UserError(
            f"{path} is a training checkpoint of version {payload['version']} (sgdph-tools "
            f"{payload.get('sgdph_tools_version', '?')}); this sgdph-tools reads up to version {VERSION}: upgrade it"
        )
    if "best_val_acc1" not in payload:  # version 1 selected on test: there is no validation best to continue
        payload["best_val_acc1"], payload["best_val_loss"] = float("-inf"), float("inf")
    return payload
