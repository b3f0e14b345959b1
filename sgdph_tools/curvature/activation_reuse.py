"""Finite differences that recompute only what the perturbed tensor changes.

With the round-robin ``rowsum`` (or ``diagonal``) estimator the finite-difference engine perturbs ONE
1-D tensor per refreshing step, then runs the forward again and a backward to that tensor. Every
module called before the first module that owns the tensor computes, in that second forward, exactly
what it computed in the step's own forward. :class:`ActivationReuse` records the outputs of those
modules during the step's forward and, in the perturbed forward, hands them back instead of running
the modules again -- detached, so the backward also stops at the perturbed layer. Averaged over the
round robin this saves about half of the extra forward and backward.

The record is the sequence of module calls before the owner, containers and leaves alike. In the
perturbed forward each call that matches the next recorded one either returns the recorded output --
and the calls made inside it are skipped with it (a whole ResNet stage in one step) -- or runs, and
its own calls are matched in turn. What keeps it exact:

- An output is handed back only if its autograd graph does not reach the tensor (a module that reads
  another module's parameter, which hooks cannot see, is run again -- and so is everything computed
  from its output), and only if nothing modified it in place after it was recorded (its version
  counter is unchanged: ``out += identity`` after a BatchNorm makes that BatchNorm run again on its
  handed-back input -- unless the block around both is handed back whole). The graph is walked
  once per tensor: the code path, so the graph, is the same every step.
- Randomness: the RNG must be where it was in the step's forward when the owning module is reached.
  If it is not -- a module that was handed back had drawn random numbers (dropout, drop-path below
  the layer) -- the caller discards the result and runs the perturbed forward in full, and reuse is
  switched off for the model, with a warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .replay import rng_state


def _tensors(output: Any) -> list[Tensor] | None:
    """The tensors of a module output that can be handed back (a tensor, or a tuple/list of them)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and output and all(isinstance(t, Tensor) for t in output):
        return list(output)
    return None


def _detached(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.detach()
    return type(output)(t.detach() for t in output)


class ActivationReuse:
    """Per model: whether reuse is still on, and what each tensor's records were found to depend on."""

    def __init__(self, model: nn.Module, rng_devices: Sequence[int] = ()):
        self.model = model
        self.cuda = list(rng_devices)
        self.enabled = True
        # per tensor (by id): the positions of the recorded calls whose graph reaches it -- usually none
        self.reads_target: dict[int, set[int]] = {}

    def for_target(self, target: Tensor) -> ReuseForTarget | None:
        if not self.enabled:
            return None
        owners = [m for m in self.model.modules() if any(p is target for p in m.parameters(recurse=False))]
        if not owners:
            return None
        return ReuseForTarget(self, target, owners)

    def switch_off(self, reason: str) -> None:
        if self.enabled:
            self.enabled = False
            warnings.warn(
                f"SGDPH: finite differences run the whole forward from now on ({reason})", RuntimeWarning, stacklevel=3
            )


@dataclass
class _Call:
    """One module call of the step's forward before the owner: its output (None: not reusable -- not
    tensors, or the call had not returned when the owner was reached), the output's version counters,
    and where the calls made inside it end in the sequence."""

    module: int
    output: Any = None
    versions: list[int] | None = None
    end: int = 0


class ReuseForTarget:
    """One refreshing step's record: the module calls before ``target``'s module, in order."""

    def __init__(self, parent: ActivationReuse, target: Tensor, owners: list[nn.Module]):
        self.parent, self.target = parent, target
        self._owners = {id(m) for m in owners}
        self._calls: list[_Call] = []
        self._rng_at_target: tuple | None = None
        self.rng_matched = True
        self.handed_back = 0  # outputs handed back in the latest shortened forward (tests, diagnostics)

    def give_up(self, reason: str) -> None:
        self.parent.switch_off(reason)

    @contextlib.contextmanager
    def recording(self):
        """Around the step's own forward: record every module call and its output until the owning
        module is called (calls still open then -- the containers around the owner -- keep no output)."""
        reached = False
        open_calls: list[_Call] = []

        def pre(module, args):
            nonlocal reached
            if reached:
                return
            if id(module) in self._owners:
                reached = True
                self._rng_at_target = rng_state(self.parent.cuda)
                return
            call = _Call(id(module))
            self._calls.append(call)
            open_calls.append(call)

        def post(module, args, output):
            if reached or not open_calls or open_calls[-1].module != id(module):
                return
            call = open_calls.pop()
            call.end = len(self._calls)
            tensors = _tensors(output)
            if tensors is not None:
                call.output, call.versions = output, [t._version for t in tensors]

        modules = list(self.parent.model.modules())
        handles = [m.register_forward_pre_hook(pre) for m in modules]
        handles += [m.register_forward_hook(post) for m in modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            if not reached:  # the target was not used in this forward: nothing can be reused
                self._calls.clear()

    @contextlib.contextmanager
    def replaying(self):
        """Around the perturbed forward: each module call that matches the next recorded one returns
        the recorded output if it may (intact, independent of the target) -- and the calls made inside
        it in the step's forward are skipped with it; otherwise it runs."""
        reading = self._reading_target()
        position = 0
        self.handed_back, self.rng_matched = 0, True

        def owner_reached(module, args):
            if self._rng_at_target is None or self.rng_matched is not True:
                return
            now = rng_state(self.parent.cuda)
            # a module handed back had drawn random numbers when the states differ: the caller discards
            self.rng_matched = torch.equal(now[0], self._rng_at_target[0]) and all(
                torch.equal(a, b) for a, b in zip(now[1], self._rng_at_target[1])
            )

        def patched(module):
            original = module.forward
            key = id(module)

            def forward(*args, **kwargs):
                nonlocal position
                if position >= len(self._calls) or self._calls[position].module != key:
                    return original(*args, **kwargs)  # past the record (above the target)
                index, call = position, self._calls[position]
                position += 1
                if (
                    call.output is None
                    or index in reading
                    or [t._version for t in _tensors(call.output)] != call.versions  # modified in place since
                ):
                    return original(*args, **kwargs)
                position = call.end
                self.handed_back += 1
                return _detached(call.output)

            return forward

        recorded = {c.module for c in self._calls}
        modules = [m for m in self.parent.model.modules() if id(m) in recorded]
        owners = [m for m in self.parent.model.modules() if id(m) in self._owners]
        handles = [m.register_forward_pre_hook(owner_reached) for m in owners]
        for m in modules:
            m.forward = patched(m)
        try:
            yield
        finally:
            for m in modules:
                del m.forward  # the class's forward again
            for h in handles:
                h.remove()

    def _reading_target(self) -> set[int]:
        """The recorded calls whose output's autograd graph reaches the target: their values depend on it."""
        known = self.parent.reads_target.get(id(self.target))
        if known is not None:
            return known
        reaches: dict[Any, bool] = {}  # autograd node -> whether the target is below it

        def below(node) -> bool:
            stack = [(node, False)]
            while stack:
                fn, expanded = stack.pop()
                if fn is None or (fn in reaches and not expanded):
                    continue
                children = [n for n, _ in fn.next_functions if n is not None]
                if not expanded:
                    reaches.setdefault(fn, getattr(fn, "variable", None) is self.target)
                    stack.append((fn, True))
                    stack.extend((n, False) for n in children if n not in reaches)
                else:
                    reaches[fn] = reaches[fn] or any(reaches.get(n, False) for n in children)
            return reaches[node]

        reading = set()
        for index, call in enumerate(self._calls):
            if call.output is not None and any(
                t.grad_fn is not None and below(t.grad_fn) for t in _tensors(call.output)
            ):
                reading.add(index)
        self.parent.reads_target[id(self.target)] = reading
        return reading
