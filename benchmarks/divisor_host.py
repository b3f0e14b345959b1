"""Host time of rebuilding the step's divisor on a refresh (``step_denominators``, the ``normalized``
rule) for T tensors of n entries: on a GPU at the paper's batch size the step is host-bound, so the
dispatches count, not the arithmetic. Median of 300 calls, one thread.

    python benchmarks/divisor_host.py          # run it at two commits to compare them
"""

from __future__ import annotations

import time

import torch

from sgdph_tools.optim.functional import step_denominators


def main() -> None:
    torch.set_num_threads(1)
    for tensors, entries in [(40, 2), (40, 256), (106, 2)]:  # resnet18_cifar's and resnet50's counts
        emas = [torch.rand(entries) for _ in range(tensors)]
        corrections = [0.3] * tensors
        times = []
        for _ in range(300):
            start = time.perf_counter()
            step_denominators(emas, corrections, so_lr=1e-3, eps=0.3, eps_in_correction=False, rule="normalized")
            times.append(time.perf_counter() - start)
        print(f"{tensors} tensors of {entries}: {sorted(times)[len(times) // 2] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
