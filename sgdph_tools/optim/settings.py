"""SGDPH's settings: which are optimizer-wide, the checks of the constructor's numbers, and what keeps
old calls and old checkpoints working."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import checks

#: Settings that hold for the whole optimizer (one engine per step; Hutchinson probes every tensor
#: at once). They sit in every param group, so they travel with ``state_dict()``; all groups agree.
OPTIMIZER_WIDE = ("estimator", "engine", "hessian_every", "gnb_fraction", "authors_code", "seed", "block_chunks")


def check_settings(**values: float) -> None:
    """The constructor's numbers: finite, and in their ranges."""
    for name, value in values.items():
        if not (name == "block_chunks" and value is None):  # None: one chunk per row
            checks.number(name, value)
    for name in ("lr", "weight_decay", "so_lr"):
        if name in values and not values[name] >= 0.0:
            raise ValueError(f"invalid {name}: {values[name]} (must be >= 0)")
    for name in ("momentum", "hessian_momentum"):  # 1 or more: the buffer never forgets, the step grows
        if name in values and not 0.0 <= values[name] < 1.0:
            raise ValueError(f"invalid {name}: {values[name]} (must be in [0, 1))")
    if "eps" in values and not values["eps"] > 0.0:
        raise ValueError(f"invalid eps: {values['eps']} (must be > 0)")
    for name, least in (("cg_steps", 1), ("block_max", 0), ("block_chunks", 1)):  # counts: integers
        if name == "block_chunks" and values.get(name, 1) is None:  # None: one chunk per row
            continue
        if name in values and (isinstance(values[name], bool) or not isinstance(values[name], int)):
            raise TypeError(f"{name} must be an integer, got {values[name]!r}")
        if name in values and values[name] < least:
            raise ValueError(f"invalid {name}: {values[name]} (must be >= {least})")


#: The per-group numbers that check_settings checks: a param group's own values get the same checks.
GROUP_NUMBERS = ("lr", "momentum", "weight_decay", "so_lr", "hessian_momentum", "eps", "cg_steps", "block_max")


def renamed_scaler(scaler: torch.amp.GradScaler | None, renamed: dict[str, Any]) -> torch.amp.GradScaler | None:
    """``step(grad_scaler=...)`` was the keyword before torch's AMP protocol; torch takes its deprecated
    path for any ``step`` with a parameter of that name, so it is read from ``**renamed`` instead."""
    unknown = set(renamed) - {"grad_scaler"}
    if unknown:
        raise TypeError(f"SGDPH.step() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    if "grad_scaler" in renamed:
        warnings.warn("SGDPH.step(grad_scaler=...) is now step(scaler=...)", FutureWarning, stacklevel=3)
        if scaler is not None and renamed["grad_scaler"] is not scaler:
            raise ValueError("pass the GradScaler once, as scaler=")
        scaler = renamed["grad_scaler"]
    return scaler


def upgrade_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """sgdph-tools 0.1 kept the step count under a string key ``"sgdph"`` in ``state`` (which
    torch.distributed.checkpoint cannot map to a parameter); now each second-order parameter has a
    ``step``. Hutchinson's generator state is no longer needed (probes depend on the step)."""
    old = state_dict.get("state", {}).get("sgdph")
    if old is None:
        return state_dict
    state = {k: v for k, v in state_dict["state"].items() if k != "sgdph"}
    for group in state_dict["param_groups"]:
        if group.get("second_order"):
            for index in group["params"]:
                state[index] = dict(state.get(index, {}), step=torch.tensor(float(old["step"])))
    return dict(state_dict, state=state)
