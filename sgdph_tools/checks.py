"""Argument checks for the public Python API: a wrong type or shape is a ``TypeError`` or
``ValueError`` that names the argument and the fix, at the call -- not zeros, or a confusing error
three frames down. (Recipe and CLI input has its own one-line errors: :mod:`sgdph_tools.recipe`.)"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor


def tensor_list(name: str, value: Any, *, requires_grad: bool = False) -> list[Tensor]:
    """``value`` as a list of tensors. A bare tensor is refused (iterating it would walk its
    elements, which silently gives wrong results), as is anything that is not tensors."""
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a list of tensors, not one tensor: pass [{name}] (a list with it)")
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    out = list(value)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
        if requires_grad and not t.requires_grad:
            raise ValueError(f"{name}[{i}] must have requires_grad=True (a parameter the loss depends on)")
    return out


def same_shapes(name: str, vectors: Sequence[Tensor], like_name: str, like: Sequence[Tensor]) -> None:
    if len(vectors) != len(like):
        raise ValueError(f"{name} must have one tensor per entry of {like_name} ({len(like)}), got {len(vectors)}")
    for i, (v, p) in enumerate(zip(vectors, like)):
        if v.shape != p.shape:
            raise ValueError(
                f"{name}[{i}] must have the shape of {like_name}[{i}], {tuple(p.shape)}; got {tuple(v.shape)}"
            )


def module(name: str, value: Any) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def function(name: str, value: Any, what: str) -> Callable:
    if not callable(value):
        raise TypeError(f"{name} must be a function that {what}, got {type(value).__name__}")
    return value


def generator(name: str, value: Any) -> torch.Generator | None:
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def names(name: str, value: Any) -> list[str]:
    """A list of strings; a bare string is refused (iterating it would give its characters)."""
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of strings, not one string: pass [{value!r}]")
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    out = list(value)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(v).__name__}")
    return out


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return value
