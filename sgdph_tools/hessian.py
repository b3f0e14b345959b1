"""Partial-Hessian estimation for channel-wise 1-D parameters.

Three *estimators* say what is estimated, from Hessian-vector products (HVPs) ``H v``:

- ``rowsum``: ``H_kk · 1`` for each tensor k -- the row sums of that tensor's own Hessian block, one
  HVP per tensor. This is what the paper's method computes. The paper calls it the exact diagonal,
  but the block is not diagonal (later layers mix channels), so it is the diagonal plus the
  off-diagonal row sums; ``docs/algorithm.md`` has the measured numbers.
- ``hutchinson``: ``z ⊙ (H z)`` with Rademacher ``z`` over all given tensors at once: one HVP, an
  unbiased estimate of the true diagonal.
- ``diagonal``: the exact diagonal of each block, one HVP per element: for tests and diagnostics.

Two *engines* say how an HVP is computed:

- ``autograd``: double backward, ``d(g · v)/dθ`` through a gradient built with ``create_graph=True``.
- ``finite_difference``: ``(g(θ + r v) - g(θ)) / r`` on the 1-D gradients only: one more forward and
  a backward that asks for the 1-D gradients, no ``create_graph``. The second forward must compute
  the same function as the first, so :class:`ForwardReplay` replays the RNG (dropout, drop-path) and
  restores every module buffer (BatchNorm running statistics) that the extra forward touches. When
  one tensor is perturbed and the model is known, that forward starts at the tensor's layer
  (:mod:`sgdph_tools.activation_reuse`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import checks

if TYPE_CHECKING:
    from .activation_reuse import ReuseForTarget

ESTIMATORS = ("rowsum", "hutchinson", "diagonal")
ENGINES = ("autograd", "finite_difference")

LossFn = Callable[[], Tensor]


def check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(map(repr, choices))}")


# ----------------------------------------------------------------------------- forward replay


@contextlib.contextmanager
def module_buffers_restored(buffers: Sequence[Tensor] = ()):
    """Within the block, every module that runs a forward gets its buffers back as they were before
    its first call (BatchNorm's running_mean/var and num_batches_tracked, any stateful buffer), and so
    does every tensor in ``buffers``.

    Modules are found by a global forward pre-hook, so no reference to the model is needed -- but
    ``torch.compile``'d modules do not call global hooks: for them, pass ``buffers`` (e.g.
    ``model.buffers()``). A buffer updated by a functional call on free tensors is not covered.
    """
    saved: dict[int, tuple[torch.nn.Module, dict[str, Tensor]]] = {}
    explicit = [(b, b.detach().clone()) for b in buffers]

    def snapshot(module: torch.nn.Module, args) -> None:
        if id(module) not in saved and module._buffers:
            saved[id(module)] = (
                module,
                {k: b.clone() for k, b in module._buffers.items() if b is not None},
            )

    handle = torch.nn.modules.module.register_module_forward_pre_hook(snapshot)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for module, module_buffers in saved.values():
                for key, value in module_buffers.items():
                    module._buffers[key].copy_(value)
            for tensor, value in explicit:
                tensor.copy_(value)


def _cuda_indices(devices: Iterable[torch.device]) -> list[int]:
    return sorted({d.index or 0 for d in devices if d.type == "cuda"})


def _rng_state(cuda: Sequence[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in cuda]


def _set_rng_state(state: tuple, cuda: Sequence[int]) -> None:
    cpu, per_device = state
    torch.set_rng_state(cpu)
    for i, s in zip(cuda, per_device):
        torch.cuda.set_rng_state(s, i)


@contextlib.contextmanager
def rng_preserved(devices: Iterable[torch.device] = ()):
    """Whatever the block draws, the CPU RNG and the given CUDA devices' RNGs end where they began."""
    cuda = _cuda_indices(devices)
    before = _rng_state(cuda)
    try:
        yield
    finally:
        _set_rng_state(before, cuda)


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
        self.cut: ReuseForTarget | None = None

    @property
    def buffers(self) -> list[Tensor]:
        return list(self._buffers()) if callable(self._buffers) else self._buffers

    def _recording(self) -> contextlib.AbstractContextManager:
        return self.cut.recording() if self.cut is not None else contextlib.nullcontext()

    def first(self) -> Tensor:
        self._rng = _rng_state(_cuda_indices(self.devices))
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
            _set_rng_state(self._rng, _cuda_indices(self.devices))
            with module_buffers_restored(self.buffers), torch.enable_grad(), cut:
                yield

    def again_grad(self, inputs: Sequence[Tensor], reuse: bool = True) -> tuple[Tensor, ...]:
        """Replay the loss and return its gradients w.r.t. ``inputs`` (zeros where unused)."""
        with self.replaying(reuse):
            loss = _scalar_loss(self.loss_fn())
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
        self._rng = _rng_state(_cuda_indices(self.devices))
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


# ----------------------------------------------------------------------------- HVP engines


class AutogradHVP:
    """HVPs by double backward through gradients that were built with ``create_graph=True``.

    ``grads[i]`` is the gradient of the loss w.r.t. ``params[i]`` (with its graph, or a tensor that
    does not require grad when that gradient is constant, i.e. its Hessian rows are zero).
    """

    def __init__(self, grads: Sequence[Tensor | None], params: Sequence[Tensor]):
        self.grads, self.params = list(grads), list(params)

    def __call__(self, vectors: dict[int, Tensor], wanted: Sequence[int]) -> list[Tensor]:
        """``(H v)`` restricted to ``params[j] for j in wanted``, where ``v`` is ``vectors[i]`` on
        ``params[i]`` and zero elsewhere."""
        pairs = [
            (self.grads[i], v) for i, v in vectors.items() if self.grads[i] is not None and self.grads[i].requires_grad
        ]
        inputs = [self.params[j] for j in wanted]
        if not pairs:  # every gradient involved is constant: these Hessian rows are zero
            return [torch.zeros_like(p) for p in inputs]
        outputs, grad_outputs = zip(*pairs)
        return list(torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, materialize_grads=True))


def finite_difference_step(params: Sequence[Tensor], vectors: Sequence[Tensor]) -> float:
    """The step r of a forward difference along ``v``: ``sqrt(eps) · max(1, rms(θ)) / rms(v)``.

    ``sqrt(eps)`` of the dtype balances truncation error (grows with r) against rounding error
    (grows as 1/r); scaling by the parameters' root-mean-square makes the perturbation relative for
    large parameters and absolute (about 3e-4 in float32) for small ones, such as betas at zero.
    """
    eps = torch.finfo(params[0].dtype).eps
    theta = torch.cat([p.detach().reshape(-1).float() for p in params])
    v = torch.cat([x.detach().reshape(-1).float() for x in vectors])
    rms_theta = theta.square().mean().sqrt().item()
    rms_v = v.square().mean().sqrt().item()
    if rms_v == 0.0:
        raise ValueError("finite-difference HVP along a zero vector")
    return eps**0.5 * max(1.0, rms_theta) / rms_v


class FiniteDifferenceHVP:
    """HVPs as ``(g(θ + r v) - g(θ)) / r``, restricted to the 1-D parameters.

    ``grads0[i]`` is the gradient of the replayed loss w.r.t. ``params[i]`` at the current point.
    Each call runs one more forward (through ``replay.again_grad()``) and a backward that asks only for
    the wanted gradients; the parameters are restored bit for bit afterwards. When the replay carries
    a ``cut`` for the one tensor moved, that forward reuses the activations below it
    (:mod:`sgdph_tools.activation_reuse`); when the RNG shows that a skipped module drew random
    numbers, the full forward runs again and its result is the one used.
    """

    def __init__(self, replay: ForwardReplay, params: Sequence[Tensor], grads0: Sequence[Tensor | None]):
        self.replay, self.params = replay, list(params)
        self.grads0 = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads0, params)]

    def __call__(self, vectors: dict[int, Tensor], wanted: Sequence[int]) -> list[Tensor]:
        moved = [self.params[i] for i in vectors]
        r = finite_difference_step(moved, list(vectors.values()))
        saved = [p.detach().clone() for p in moved]
        inputs = [self.params[j] for j in wanted]
        cut = self.replay.cut
        if cut is not None and (len(moved) != 1 or moved[0] is not cut.target):
            cut = None  # the recorded activations are those below another tensor
        try:
            with torch.no_grad():
                for p, v in zip(moved, vectors.values()):
                    p.add_(v, alpha=r)
            grads1 = self.replay.again_grad(inputs, reuse=cut is not None)
            if cut is not None and not cut.rng_matched:  # a module handed back had drawn random numbers
                cut.parent.switch_off("a module below the perturbed layer draws random numbers: dropout, drop-path")
                grads1 = self.replay.again_grad(inputs, reuse=False)
            hv = [(g1.detach() - self.grads0[j]).div_(r) for g1, j in zip(grads1, wanted)]
        finally:
            with torch.no_grad():
                for p, s in zip(moved, saved):
                    p.copy_(s)
        return hv


HVP = Callable[[dict[int, Tensor], Sequence[int]], list[Tensor]]


# ----------------------------------------------------------------------------- estimators


def rademacher_like(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A ±1 tensor shaped like ``t``, drawn on the generator's device and moved to ``t``'s."""
    device = generator.device if generator is not None else t.device
    z = torch.randint(0, 2, t.shape, generator=generator, device=device, dtype=torch.int8)
    return z.to(device=t.device, dtype=t.dtype).mul_(2).sub_(1)


def estimate(
    estimator: str,
    hvp: HVP,
    params: Sequence[Tensor],
    indices: Sequence[int],
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """The ``estimator``'s estimate for ``params[k] for k in indices`` (same shapes), from ``hvp``."""
    check_choice("estimator", estimator, ESTIMATORS)
    if not indices:
        return []
    if estimator == "rowsum":
        # Each tensor's own block only: v = 1 on tensor k, 0 elsewhere, and read back tensor k.
        return [hvp({k: torch.ones_like(params[k])}, [k])[0] for k in indices]
    if estimator == "hutchinson":
        z = {k: rademacher_like(params[k], generator) for k in indices}
        hz = hvp(z, list(indices))
        return [zk * hzk for zk, hzk in zip(z.values(), hz)]
    # diagonal: one HVP per element with a one-hot vector.
    out = []
    for k in indices:
        diag = torch.empty_like(params[k]).reshape(-1)
        for j in range(diag.numel()):
            e = torch.zeros_like(params[k]).reshape(-1)
            e[j] = 1.0
            diag[j] = hvp({k: e.view_as(params[k])}, [k])[0].reshape(-1)[j]
        out.append(diag.view_as(params[k]))
    return out


# ----------------------------------------------------------------------------- public function


def partial_hessian(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    estimator: str = "rowsum",
    engine: str = "autograd",
    generator: torch.Generator | None = None,
    *,
    buffers: Iterable[Tensor] = (),
) -> list[Tensor]:
    """Estimate the partial Hessian of a loss w.r.t. channel-wise 1-D parameters.

    Args:
        loss_fn: recomputes the scalar loss: runs the forward pass and returns the loss, without
            calling backward. The finite-difference engine calls it more than once.
        params: the 1-D tensors (``requires_grad=True``).
        estimator: ``"rowsum"`` (``H_kk · 1`` per tensor, the paper's quantity), ``"hutchinson"``
            (``z ⊙ Hz``, unbiased for the true diagonal) or ``"diagonal"`` (exact, one HVP per element).
        engine: ``"autograd"`` (double backward) or ``"finite_difference"``.
        generator: random generator for Hutchinson's probe vectors.
        buffers: tensors to restore after the finite-difference engine's extra forwards, needed
            only for ``torch.compile``'d models (others are found automatically; see
            :func:`module_buffers_restored`).

    Returns:
        One tensor per parameter, same shape, detached (plain values, no graph).
    """
    checks.function("loss_fn", loss_fn, "runs the forward pass and returns the loss")
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("engine", engine, ENGINES)
    params = checks.tensor_list("params", params, requires_grad=True)
    checks.generator("generator", generator)
    buffers = checks.tensor_list("buffers", buffers)
    if not params:
        return []
    replay = ForwardReplay(loss_fn, {p.device for p in params}, buffers)
    create_graph = engine == "autograd"
    with torch.enable_grad():
        with math_attention() if create_graph else contextlib.nullcontext():  # fused attention: no double backward
            loss = replay.first()
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, materialize_grads=True)
        if create_graph:
            hvp: HVP = AutogradHVP(grads, params)
        else:
            hvp = FiniteDifferenceHVP(replay, params, [g.detach() for g in grads])
        result = estimate(estimator, hvp, params, range(len(params)), generator)
    return [h.detach() for h in result]


# ----------------------------------------------------------------------------- double backward helpers


def math_attention() -> contextlib.AbstractContextManager:
    """A context in which ``scaled_dot_product_attention`` takes its math path, which (unlike the
    fused kernels timm's transformers select) has a double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def no_double_backward_error(error: RuntimeError) -> RuntimeError | None:
    """A one-line error naming the fix when ``error`` says an op has no double backward, else None."""
    text = str(error)
    if not ("derivative for" in text and "not implemented" in text):
        return None
    op = text.split("derivative for", 1)[1].split("is not implemented", 1)[0].strip()
    attention = "attention" in op
    fix = (
        "fused attention has no double backward: set TIMM_FUSED_ATTN=0 before importing timm, or run the "
        "forward under torch.nn.attention.sdpa_kernel(SDPBackend.MATH), or let the optimizer run it "
        "(optimizer.step(closure) or step(loss_fn=...) pick the math attention themselves)"
        if attention
        else "use engine='finite_difference', which needs no double backward"
    )
    return RuntimeError(f"SGD-PH's autograd engine needs a double backward, which {op} does not have; {fix}")
