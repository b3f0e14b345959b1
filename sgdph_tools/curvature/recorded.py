"""A model's latest training forward, recorded so that curvature can be computed from a forward of its
own after the step's backward has freed the graph.

:class:`RecordedForward` puts a forward pre-hook on the model that keeps the inputs of its latest
forward in train mode (references, no copy), and :meth:`RecordedForward.rerun` runs the model again
on them -- or on their leading rows -- as the same function the training run saw, without disturbing
it: only the wanted parameters require gradients (a backward computes no weight gradient it does
not need), BatchNorm buffers and the RNG are put back afterwards, the recorded autocast is
re-entered, and under ``DistributedDataParallel`` or ``torch.compile`` the wrapped module runs (no
reducer, no recompilation for a smaller batch). Users: SGD-PH's sub-batch Gauss-Newton-Bartlett
(:class:`~.gauss_newton.SubBatchGNB`) and the block-diagonal Hessian-free optimizer's GGN products
(:class:`sgdph_tools.optim.BlockHessianFree`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .replay import gradients_only_for, module_buffers_restored, rng_preserved


class RecordedForward:
    """Records the inputs of ``model``'s latest train-mode forward while ``enabled`` is true;
    :meth:`remove` takes the hook off. The hook holds this object and the model only, so whoever
    owns it (an optimizer) can be collected while the model lives. ``buffers``: restored after
    every :meth:`rerun` (give ``model.buffers()``: compiled modules do not call global hooks)."""

    #: the name users see in errors (the option that asked for the extra forward)
    purpose = "the curvature forward"
    #: appended to the error for a model that does not return logits: what to do instead
    logits_hint = ""

    def __init__(self, model: torch.nn.Module, buffers: Sequence[Tensor] = (), enabled: bool = True):
        self.buffers, self.enabled = list(buffers), enabled
        self.module = unwrapped(model)
        self.runner: torch.nn.Module = self.module  # what runs the forward: the module, or compile()'s
        self._inputs: tuple[tuple, dict, tuple[str, bool, torch.dtype] | None] | None = None
        self._running = False
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and not self._running and self.enabled:
            self._inputs = (args, kwargs, _autocast_state(args, kwargs))

    def remove(self) -> None:
        self._handle.remove()

    def compile(self, mode: str = "default") -> None:
        """Run the forward (and so its backward) compiled, as a graph of its own: the module itself is
        compiled again, statically -- its sub-batch shape and which parameters require gradients are
        fixed -- rather than going through the training run's compiled wrapper, which would recompile
        for them (dynamic shapes) each time it alternated. The buffers put back are then the module's own,
        listed (a global hook to find them would make the compiled forward recompile at every rerun)."""
        self.buffers = self.buffers or list(self.module.buffers())
        self.runner = torch.compile(self.module, mode=mode, dynamic=False)

    def forget(self) -> None:
        """Drop the recorded inputs (references to a batch the caller may want freed)."""
        self._inputs = None

    @contextlib.contextmanager
    def rerun(self, params: Sequence[Tensor], fraction: float = 1.0) -> Iterator[tuple[Tensor, int]]:
        """``(logits, rows)``: the model's output on the first ``rows = max(2, round(fraction·B))``
        rows of the recorded inputs (every input tensor whose first dimension is the batch is cut),
        with only ``params`` requiring gradients. Use the logits' graph inside the block: buffers and
        RNG are put back when it ends (BatchNorm saves its statistics for backward)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"invalid fraction of the batch: {fraction} (must be in (0, 1])")
        if self._inputs is None:
            raise RuntimeError(
                f"{self.purpose}: the model has not run a forward in train mode since it was given to "
                "the optimizer; the curvature is computed from that forward's inputs"
            )
        args, kwargs, autocast = self._inputs
        batch = _batch_size(args, kwargs, self.purpose)
        rows = min(batch, max(2, round(fraction * batch)))
        if rows < batch:
            args, kwargs = _leading_rows((args, kwargs), batch, rows)
        autocast_ctx = (
            torch.autocast(autocast[0], dtype=autocast[2], enabled=autocast[1])
            if autocast is not None
            else contextlib.nullcontext()
        )
        self._running = True  # the forward below is ours: not recorded
        try:
            with (
                gradients_only_for(self.module.parameters(), params),
                rng_preserved({p.device for p in params}),
                module_buffers_restored(self.buffers, find_modules=self.runner is self.module),
                torch.enable_grad(),
            ):
                with autocast_ctx:
                    logits = self.runner(*args, **kwargs)
                if not isinstance(logits, Tensor) or logits.ndim != 2:
                    got = f"{type(logits).__name__}{tuple(logits.shape) if isinstance(logits, Tensor) else ''}"
                    raise ValueError(
                        f"{self.purpose} needs a model whose forward returns [batch, classes] logits; "
                        f"got {got}{self.logits_hint}"
                    )
                yield logits, rows
        finally:
            self._running = False


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module to run again: past DDP's reducer and torch.compile's wrapper."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _tensors(inputs: Any) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, (list, tuple)):
        return [t for x in inputs for t in _tensors(x)]
    if isinstance(inputs, dict):
        return [t for x in inputs.values() for t in _tensors(x)]
    return []


def _batch_size(args: tuple, kwargs: dict, purpose: str) -> int:
    batched = [t for t in _tensors((args, kwargs)) if t.ndim >= 1]
    if not batched:
        raise ValueError(f"{purpose}: the model's forward took no tensor input to take a batch from")
    return batched[0].shape[0]


def _leading_rows(inputs: Any, batch: int, rows: int) -> Any:
    """Every tensor whose first dimension is the batch, cut to its first ``rows`` rows."""
    if isinstance(inputs, Tensor):
        return inputs[:rows] if inputs.ndim >= 1 and inputs.shape[0] == batch else inputs
    if isinstance(inputs, tuple):
        return tuple(_leading_rows(x, batch, rows) for x in inputs)
    if isinstance(inputs, list):
        return [_leading_rows(x, batch, rows) for x in inputs]
    if isinstance(inputs, dict):
        return {k: _leading_rows(v, batch, rows) for k, v in inputs.items()}
    return inputs


def _autocast_state(args: tuple, kwargs: dict) -> tuple[str, bool, torch.dtype] | None:
    tensors = _tensors((args, kwargs))
    if not tensors:
        return None
    device = tensors[0].device.type
    if device not in ("cpu", "cuda"):
        return None
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
