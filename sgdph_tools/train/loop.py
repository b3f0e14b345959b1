"""One training step, one epoch, one evaluation. The trainer (trainer.py) puts them together.

How a step runs depends on the optimizer:
- SGD-PH: ``optimizer.step(loss_fn=...)`` -- the optimizer runs the backward passes itself, with the
  GradScaler and clipping handed to it (the gradients only exist inside step);
- block-diagonal Hessian-free: ``optimizer.step(closure)`` -- a standard closure (zero_grad, forward,
  backward, clipping), which the optimizer calls again at the new parameters;
- second-order baselines (AdaHessian): ``backward(create_graph=True)``, then ``step()``;
- everything else: the usual ``backward()``, optional unscale and clip, ``step()``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..errors import UserError
from ..optim import SGDPH, BlockHessianFree


class Diverged(UserError):
    """Training diverged: the loss became inf or NaN, or stayed far above where it started."""


class NonFiniteLoss(Diverged):
    """The training loss became inf or NaN."""


class DivergenceGuard:
    """Stops a run whose training loss explodes but stays finite (loss 4e18, top-1 at chance).

    The reference is the mean loss of the run's first window (the first ``log_every`` iterations), or
    the loss of an untrained classifier over ``num_classes`` classes, ln C, when that is lower -- a run
    blown up within its first window (loss 1e20 from the start) is then caught too; a window is the
    iterations between two checks. When ``patience`` windows in a row have a mean loss above
    ``factor`` times the reference, :class:`Diverged` is raised. ``factor`` None: off. The reference
    travels in the checkpoint, so a resumed run compares against the same start."""

    def __init__(
        self, factor: float | None, patience: int, reference: float | None = None, num_classes: int | None = None
    ):
        self.factor, self.patience, self.reference, self.strikes = factor, patience, reference, 0
        self.chance = math.log(num_classes) if num_classes and num_classes > 1 else None

    def check(self, window_loss: float, epoch: int, iteration: int) -> None:
        if not math.isfinite(window_loss):
            raise NonFiniteLoss(f"the training loss became non-finite in epoch {epoch + 1}, iteration {iteration}")
        if self.factor is None:
            return
        if self.reference is None:
            self.reference = window_loss if self.chance is None else min(window_loss, self.chance)
            if window_loss <= self.factor * self.reference:
                return
        self.strikes = self.strikes + 1 if window_loss > self.factor * self.reference else 0
        if self.strikes >= self.patience:
            raise Diverged(
                f"the training loss diverged in epoch {epoch + 1}, iteration {iteration}: {window_loss:.4g}, "
                f"above {self.factor:g}x its starting value {self.reference:.4g} (or an untrained classifier's) "
                f"for {self.patience} checks in a row"
            )


@dataclass
class StepSettings:
    device: torch.device
    precision: str  # fp32, bf16, fp16
    scaler: torch.amp.GradScaler | None
    grad_clip: float | None
    channels_last: bool
    sharded: bool = False  # FSDP2: every process must run as many forwards (each gathers parameters)

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, s: StepSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimization step; returns the batch's (loss, logits), detached."""
    if isinstance(optimizer, SGDPH):
        first: list[torch.Tensor] = []

        def loss_fn() -> tuple[torch.Tensor, torch.Tensor]:  # called again by the finite-difference engine
            with s.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            if not first:
                first.append(logits.detach())
            return loss, logits  # the Gauss-Newton estimates read the logits

        loss = optimizer.step(loss_fn=loss_fn, scaler=s.scaler, max_grad_norm=s.grad_clip)
        if s.scaler is not None:
            s.scaler.update()
        return loss.detach(), first[0]

    if isinstance(optimizer, BlockHessianFree):
        logged: list[torch.Tensor] = []

        def closure() -> tuple[torch.Tensor, torch.Tensor]:  # called again at the new parameters
            optimizer.zero_grad(set_to_none=True)
            with s.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            if s.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            if not logged:
                logged.append(logits.detach())
            return loss, logits

        loss = optimizer.step(closure)
        return loss.detach(), logged[0]

    optimizer.zero_grad(set_to_none=True)
    with s.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    create_graph = bool(getattr(optimizer, "is_second_order", False))
    (s.scaler.scale(loss) if s.scaler else loss).backward(create_graph=create_graph)
    if s.grad_clip is not None:
        if s.scaler:
            s.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    if s.scaler:
        s.scaler.step(optimizer)
        s.scaler.update()
    else:
        optimizer.step()
    if create_graph:  # free the double-backward graph held by .grad
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()


def _to_device(batch, s: StepSettings):
    x, y = batch
    x = x.to(s.device, non_blocking=True)
    if s.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(s.device, non_blocking=True)


def train_one_epoch(
    model,
    optimizer,
    scheduler,
    loader,
    s: StepSettings,
    *,
    epoch: int,
    log_every: int,
    on_progress: Callable[[int, dict], None] | None = None,
    guard: DivergenceGuard | None = None,
) -> dict:
    """Train for one epoch; returns train_loss, train_acc1 (percent) and images per second, reduced
    over processes. Every ``log_every`` iterations, where the running sums are read anyway, the
    mean loss since the last check (averaged over processes, so that all stop together) goes to
    ``guard``, which raises :class:`Diverged` on a non-finite or exploding loss."""
    guard = guard or DivergenceGuard(None, 1)
    model.train()
    # Running sums stay on the device (no sync per iteration); the count is known on the host.
    totals = torch.zeros(2, device=s.device, dtype=torch.float64)  # loss sum, correct
    count, checked_sum, checked_count = 0, 0.0, 0
    start = time.perf_counter()
    for i, batch in enumerate(loader, 1):
        x, y = _to_device(batch, s)
        loss, logits = train_step(model, optimizer, x, y, s)
        scheduler.step()
        count += y.numel()
        totals[0] += loss.double() * y.numel()
        totals[1] += (logits.argmax(1) == y).sum()
        if i % log_every == 0 or i == len(loader):
            loss_sum, correct = totals.tolist()
            window = torch.tensor([loss_sum - checked_sum, float(count - checked_count)], dtype=torch.float64)
            window_sum, window_count = distributed.all_reduce_sum_(window.to(s.device)).tolist()
            guard.check(window_sum / window_count, epoch, i)
            checked_sum, checked_count = loss_sum, count
            if on_progress is not None:
                on_progress(
                    i,
                    {
                        "loss": loss_sum / count,
                        "acc1": 100 * correct / count,
                        "lr": optimizer.param_groups[0]["lr"],
                        "img_s": count * distributed.world_size() / (time.perf_counter() - start),
                    },
                )
    seconds = time.perf_counter() - start
    totals = torch.cat([totals, torch.tensor([float(count)], device=s.device, dtype=torch.float64)])
    loss_sum, correct, count = distributed.all_reduce_sum_(totals).tolist()
    return {
        "train_loss": loss_sum / count,
        "train_acc1": 100 * correct / count,
        "train_images_per_second": count / seconds,
        "train_seconds": seconds,
    }


@torch.no_grad()
def evaluate(model, loader, s: StepSettings, split: str = "test") -> dict:
    """Loss, top-1 and top-5 accuracy (percent, as timm reports them) on ``split`` (the keys'
    prefix: ``val`` or ``test``), exact over processes."""
    model.eval()
    totals = torch.zeros(4, device=s.device, dtype=torch.float64)  # loss sum, top-1, top-5, count
    x = None
    for batch in loader:
        x, y = _to_device(batch, s)
        with s.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        totals[0] += loss.double()
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(1).sum()
        totals[3] += y.numel()
    if s.sharded:  # the evaluation split is not padded (sums stay exact): the shorter shards run idle forwards
        most = torch.tensor([len(loader)], device=s.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        for _ in range(int(most.item()) - len(loader)):
            with s.autocast():
                model(x)
    loss_sum, top1, top5, count = distributed.all_reduce_sum_(totals).tolist()
    return {f"{split}_loss": loss_sum / count, f"{split}_acc1": 100 * top1 / count, f"{split}_acc5": 100 * top5 / count}
