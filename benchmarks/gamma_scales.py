"""How large the weight-normalised layers' gammas ended, per run: the mechanism behind the no-BN rows
of docs/evidence.md (weight decay on the gammas shrinks them, and with them each layer's output scale).

    python benchmarks/gamma_scales.py RUN_DIR [RUN_DIR ...]

For every run (an ``sgdph train`` folder with ``last.pt``) and every ``*.gamma`` parameter of its
model -- the per-channel scale ``sgdph convert --wn`` decouples from a conv or linear weight -- prints
the mean |gamma| at the end of training, one row per run, one column per layer (input side first).
A weight-normalised layer computes ``gamma * (W / |W|) x + bias``, so the gamma is the layer's gain:
what decay on it takes away, the layer's output loses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sgdph_tools.train.state import load_training_state


def gamma_scales(run: Path) -> dict[str, float]:
    """``{parameter name: mean |gamma|}`` of the run's last checkpoint, in the model's order."""
    state_dict = load_training_state(run / "last.pt")["state_dict"]
    return {k: float(v.abs().mean()) for k, v in state_dict.items() if k.endswith(".gamma")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    rows = {run: gamma_scales(run) for run in args.runs}
    layers = list(next(iter(rows.values())))
    print("| run | " + " | ".join(name.removesuffix(".gamma") for name in layers) + " |")
    print("|---|" + "---|" * len(layers))
    for run, scales in rows.items():
        cells = " | ".join(f"{scales[name]:.3f}" if name in scales else "—" for name in layers)
        print(f"| {run.parent.name}/{run.name} | {cells} |")


if __name__ == "__main__":
    main()
