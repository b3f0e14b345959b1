"""When SGD-PH refreshes its curvature estimate, and for which tensors.

A step t (counted from 1) is refreshing when ``(t - 1) % hessian_every == 0``. Estimators that cover
every tensor at once (Hutchinson, GNB) refresh all second-order tensors that have a gradient; the
others (rowsum, diagonal: one product per tensor) refresh ONE, round robin in parameter order -- the
tensor with the fewest refreshes so far, first in order, so frozen or unused tensors are skipped
without breaking the cycle. The refresh counts live in the optimizer's per-parameter state
(``hessian_refreshes``), so the cycle resumes from a checkpoint where it stopped.

``authors_code`` follows the authors' released round robin instead: the ((t - 1) mod M + 1)-th 1-D
parameter that has a gradient, M counting every 1-D parameter; the last 1-D parameter takes an SGD
step (the HVP their code computes for it and discards is skipped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import distributed


@dataclass(frozen=True)
class RefreshSchedule:
    every: int  # hessian_every
    round_robin: bool  # one tensor per refresh (else all of them)
    authors_code: bool = False
    seed: int = 0  # of the random draws (Hutchinson's probes, GNB's labels)

    def refreshes(self, step: int) -> bool:
        return (step - 1) % self.every == 0

    def choose(
        self,
        step: int,
        candidates: Sequence[Tensor],
        state: Mapping[Tensor, dict[str, Any]],
        one_d: Sequence[Tensor] = (),
    ) -> list[Tensor]:
        """The tensors to refresh at ``step`` among ``candidates`` (the second-order tensors with a
        gradient). ``one_d``: every 1-D parameter in order (the authors' round robin only)."""
        if not candidates:
            return []
        if self.authors_code:
            with_grad = [p for p in one_d if p.grad is not None]
            k = (step - 1) % len(one_d)
            chosen = with_grad[k] if k < len(with_grad) else None
            return [chosen] if chosen is not None and any(chosen is c for c in candidates) else []
        if not self.round_robin:
            return list(candidates)
        counts = [state[p].get("hessian_refreshes", 0) if p in state else 0 for p in candidates]
        return [candidates[counts.index(min(counts))]]

    def generator(self, step: int, same_on_every_rank: bool = False) -> torch.Generator:
        """The random draws of step t on rank r come from a generator seeded with (seed, r, t):
        replicas draw independently (the all-reduce averages them), a resumed run draws the same ones,
        and no per-rank generator state has to survive a checkpoint (torch's distributed checkpoint
        keeps one copy of tensors that are not sharded). ``same_on_every_rank``: rank 0's draws on
        every rank -- one probe for a product of the global batch, each rank keeping its shard of it
        (Hutchinson under FSDP2), the same probe as a one-process run."""
        rank = 0 if same_on_every_rank else distributed.rank()
        mixed = (self.seed * 1_000_003 + rank) * 1_000_000_007 + step
        return torch.Generator().manual_seed(mixed % (2**63 - 1))


def start_round_robin(state: Mapping[Tensor, dict[str, Any]], cycle: Sequence[Tensor], index: int) -> None:
    """Make the round robin over ``cycle`` (the second-order tensors, in order) refresh ``cycle[index]``
    next, by marking the tensors before it as refreshed once more than the rest. ``sgdph bench`` starts
    its timing windows at different tensors this way (a product's cost depends on the tensor's depth)."""
    if not 0 <= index < max(len(cycle), 1):
        raise ValueError(f"index {index} is outside the round robin's {len(cycle)} tensors")
    for i, p in enumerate(cycle):
        state[p]["hessian_refreshes"] = 1 if i < index else 0
