"""Running a loss again as the same function: the extra forwards that finite differences and the
sub-batch estimates need must see the RNG and the module buffers (BatchNorm running statistics) that
the step's own forward saw, and leave both as the training run expects them.

- :func:`module_buffers_restored`, :func:`rng_preserved`: put buffers and RNG back after a block.
- :func:`gradients_only_for`: a backward that computes only the gradients that are read.
- :class:`ForwardReplay` (a loss function) and :class:`ClosureReplay` (a ``torch.optim`` closure): run
  once for real, then again on demand with the first run's RNG.
- :class:`ActivationCut`: what a replay needs from a record of activations it may reuse
  (:mod:`.activation_reuse` implements it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from .sharded import gradients_by_backward, is_sharded

LossFn = Callable[[], Tensor]


class ActivationCut(Protocol):
    """A record of the activations below one perturbed tensor, reusable by a replay of the forward."""

    target: Tensor
    rng_matched: bool  # after a replay: the RNG was where the step's forward had it at the target

    def recording(self) -> contextlib.AbstractContextManager: ...

    def replaying(self) -> contextlib.AbstractContextManager: ...

    def give_up(self, reason: str) -> None:
        """Stop reusing activations for this model (e.g. a module below the target draws random numbers)."""


@contextlib.contextmanager
def module_buffers_restored(buffers: Sequence[Tensor] = (), find_modules: bool = True):
    """Within the block, every module that runs a forward gets its buffers back as they were before
    its first call (BatchNorm's running_mean/var and num_batches_tracked, any stateful buffer), and so
    does every tensor in ``buffers``.

    Modules are found by a global forward pre-hook, so no reference to the model is needed -- but
    ``torch.compile``'d modules do not call global hooks: for them, pass ``buffers`` (e.g.
    ``model.buffers()``). A buffer updated by a functional call on free tensors is not covered.
    ``find_modules=False``: ``buffers`` only, no global hook (a compiled forward would recompile for
    every new hook: dynamo guards on the global hooks it inlines).
    """
    saved: dict[int, tuple[torch.nn.Module, dict[str, Tensor]]] = {}
    buffers = list(buffers)
    explicit = list(zip(buffers, copies(buffers)))
    covered = {id(b) for b, _ in explicit}  # snapshotted already: the hook does not clone them again

    def snapshot(module: torch.nn.Module, args) -> None:
        if id(module) not in saved and module._buffers:
            saved[id(module)] = (
                module,
                {k: b.clone() for k, b in module._buffers.items() if b is not None and id(b) not in covered},
            )

    handle = torch.nn.modules.module.register_module_forward_pre_hook(snapshot) if find_modules else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        targets = [module._buffers[key] for module, values in saved.values() for key in values]
        values = [value for _, module_values in saved.values() for value in module_values.values()]
        targets += [tensor for tensor, _ in explicit]
        values += [value for _, value in explicit]
        if targets:
            with torch.no_grad():
                torch._foreach_copy_(targets, values)  # one multi-tensor copy, not one per buffer


def copies(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` (no autograd history) in one multi-tensor copy per device and dtype: a
    ``clone`` each would be a launch each on a GPU (60 for resnet18's BatchNorm buffers, on every
    refresh). Copies, bit for bit (``copy_``: no arithmetic)."""
    if not tensors:  # torch's grouping refuses an empty list
        return []
    out = [torch.empty_like(t, requires_grad=False) for t in tensors]
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype([out, list(tensors)])  # type: ignore[list-item]
    with torch.no_grad():
        for (targets, sources), _ in grouped.values():
            torch._foreach_copy_(targets, sources)
    return out


def cuda_indices(devices: Iterable[torch.device]) -> list[int]:
    return sorted({d.index or 0 for d in devices if d.type == "cuda"})


def rng_state(cuda: Sequence[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in cuda]


def set_rng_state(state: tuple, cuda: Sequence[int]) -> None:
    cpu, per_device = state
    torch.set_rng_state(cpu)
    for i, s in zip(cuda, per_device):
        torch.cuda.set_rng_state(s, i)


@contextlib.contextmanager
def rng_preserved(devices: Iterable[torch.device] = ()):
    """Whatever the block draws, the CPU RNG and the given CUDA devices' RNGs end where they began."""
    cuda = cuda_indices(devices)
    before = rng_state(cuda)
    try:
        yield
    finally:
        set_rng_state(before, cuda)


@contextlib.contextmanager
def gradients_only_for(params: Iterable[Tensor], wanted: Iterable[Tensor]):
    """Within the block, every tensor of ``params`` not in ``wanted`` has ``requires_grad`` off, so
    a backward computes only what is wanted (no weight gradients of the layers in between)."""
    keep = {id(t) for t in wanted}
    switched = [p for p in params if p.requires_grad and id(p) not in keep]
    try:
        for p in switched:
            p.requires_grad_(False)
        yield
    finally:
        for p in switched:
            p.requires_grad_(True)


class ForwardReplay:
    """Runs a loss function once for real, then again any number of times as the same function.

    ``first()`` records the RNG states (CPU and the given CUDA devices) and calls ``loss_fn``; each
    ``again_grad()`` restores those RNG states, runs ``loss_fn`` and a backward with every module
    buffer restored afterwards, and leaves the RNG where ``first()`` left it -- so the extra forwards change neither
    the randomness nor the buffers that the training run sees.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        devices: Iterable[torch.device] = (),
        buffers: Sequence[Tensor] | Callable[[], Sequence[Tensor]] = (),
    ):
        # buffers may be a function that lists them: called only when a replay happens, so a step
        # that replays nothing does not walk the model's modules (host time that shows on a GPU)
        self.loss_fn, self._buffers = loss_fn, buffers if callable(buffers) else list(buffers)
        self.devices = list(devices)
        self._rng: tuple | None = None
        # set before first(): the activations below one perturbed tensor are recorded and reused
        self.cut: ActivationCut | None = None
        #: under FSDP2 (sharded inputs) a gradient comes from FSDP's backward, which writes the
        #: ``.grad`` of every parameter: those to put back afterwards (:mod:`.sharded`)
        self.every_param: list[Tensor] = []
        #: False: restore ``buffers`` only, without the global hook that finds modules (a compiled
        #: model would recompile for every new hook: :func:`module_buffers_restored`)
        self.find_modules = True

    @property
    def buffers(self) -> list[Tensor]:
        return list(self._buffers()) if callable(self._buffers) else self._buffers

    def _recording(self) -> contextlib.AbstractContextManager:
        return self.cut.recording() if self.cut is not None else contextlib.nullcontext()

    def first(self) -> Tensor:
        self._rng = rng_state(cuda_indices(self.devices))
        with self._recording():
            return _scalar_loss(self.loss_fn())

    @contextlib.contextmanager
    def replaying(self, reuse: bool = True):
        """The block runs with the RNG as ``first()`` found it and every buffer restored after it
        (and, with ``reuse`` and a ``cut``, the recorded activations below the perturbed tensor).

        Forward and backward must both run inside: BatchNorm saves its running statistics for
        backward, so they may only be put back after it.
        """
        if self._rng is None:
            raise RuntimeError(f"{type(self).__name__}: replay requested before first()")
        cut = self.cut.replaying() if reuse and self.cut is not None else contextlib.nullcontext()
        with rng_preserved(self.devices):  # ... and afterwards where first() left it
            set_rng_state(self._rng, cuda_indices(self.devices))
            with module_buffers_restored(self.buffers, self.find_modules), torch.enable_grad(), cut:
                yield

    def again_grad(self, inputs: Sequence[Tensor], reuse: bool = True) -> tuple[Tensor, ...]:
        """Replay the loss and return its gradients w.r.t. ``inputs`` (zeros where unused)."""
        with self.replaying(reuse):
            loss = _scalar_loss(self.loss_fn())
            if is_sharded(inputs):
                return tuple(gradients_by_backward(loss, inputs, self.every_param or inputs))
            return torch.autograd.grad(loss, inputs, materialize_grads=True)


class ClosureReplay(ForwardReplay):
    """The same for a standard ``torch.optim`` closure (it zeroes the grads, runs forward and
    backward, returns the loss), as ``torch.optim.LBFGS`` re-evaluates one.

    ``again_grad(inputs)`` sets the real gradients of ``params`` aside (the closure would zero or
    overwrite them), calls the closure again and reads the gradients of ``inputs`` from ``.grad``,
    then puts the real gradients back. With ``cheap=True`` every other parameter has
    ``requires_grad`` switched off during the call, so the backward computes only what is read
    (no weight gradients of the convolutions); switch it off where that is unsafe (a DDP reducer
    that expects every gradient, a compiled model that would recompile). ``sync`` is entered around
    the call (e.g. ``DistributedDataParallel.no_sync``).
    """

    def __init__(
        self,
        closure: Callable[[], object],
        params: Sequence[Tensor],
        devices: Iterable[torch.device] = (),
        buffers: Sequence[Tensor] | Callable[[], Sequence[Tensor]] = (),
        *,
        cheap: bool = True,
        sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        super().__init__(closure, devices, buffers)  # type: ignore[arg-type]
        self.params, self.cheap, self.sync = list(params), cheap, sync

    def first(self):
        self._rng = rng_state(cuda_indices(self.devices))
        with self.sync(), torch.enable_grad(), self._recording():
            return self.loss_fn()

    def again_grad(self, inputs: Sequence[Tensor], reuse: bool = True) -> tuple[Tensor, ...]:
        saved = [p.grad for p in self.params]
        only_inputs = gradients_only_for(self.params, inputs) if self.cheap else contextlib.nullcontext()
        try:
            for p in self.params:
                p.grad = None
            with only_inputs, self.replaying(reuse), self.sync():
                self.loss_fn()
            return tuple(t.grad.detach() if t.grad is not None else torch.zeros_like(t) for t in inputs)
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g

    def again_loss(self, sync: Callable[[], contextlib.AbstractContextManager] | None = None):
        """Call the closure again as ``first()`` did (its RNG; buffers restored after) and return what
        it returns -- the loss at the parameters as they are now; the real gradients are kept aside.
        ``sync`` (default: the replay's own) is entered around the call: e.g. ``no_sync`` of a DDP
        module whose first call did reduce the gradients."""
        saved = [p.grad for p in self.params]
        try:
            for p in self.params:
                p.grad = None
            with self.replaying(reuse=False), (sync or self.sync)():
                return self.loss_fn()
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g


def _scalar_loss(loss) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(
            "loss_fn must return the scalar loss tensor (forward only, without calling backward); "
            f"got {type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}"
        )
    if not loss.requires_grad:
        raise RuntimeError(
            "the loss returned by loss_fn does not require grad: run it with gradients enabled "
            "(not under torch.no_grad()) and on parameters with requires_grad=True"
        )
    return loss.reshape(())
