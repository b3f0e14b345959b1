"""The study of docs/evidence.md: every sweep it ran, and how its tables were made.

    python benchmarks/study.py plan                       # print every sweep command, run nothing
    python benchmarks/study.py run --stage 1 [--only shapes-small_cnn/sgd ...]
    python benchmarks/study.py run --stage 2              # the chosen configurations on 3 more seeds
    python benchmarks/study.py run --stage 2 --seeds 4-7  # ... and on more, where the noise needs them
    python benchmarks/study.py tables > tables.md         # the tables of docs/evidence.md

Protocol (the same for every contender, so that no contender gets more tuning than another):

- Stage 1 tunes: each contender's grid has 6 configurations (lr x weight decay for SGDM and AdamW;
  SGD-PH keeps SGDM's weight decay and spends half of its budget on its own knob, τ for the paper's
  rule, ε for the others; the block-diagonal Hessian-free baseline, whose lr is 1 -- its solved step --
  tunes its initial damping λ in place of lr, with its own weight decays: ``HF_WEIGHT_DECAYS``), one seed (0),
  selected on the validation split's top-1
  at the last epoch.
  Where the chosen lr (λ) is the grid's largest or smallest, the grid is extended once by the next value
  in that direction (same ratio, with each value of the other axis: 2 more configurations) and the
  choice is made again over both -- the same rule for every contender.
- Stage 2 evaluates: the chosen configuration runs seeds 1-3 (seed 0 is stage 1's run), and the
  tables report test top-1, mean ± std over these 4 distinct seeds. Test is never looked at to choose.

Benchmarks: digits (8x8, 30 epochs, batch 32) and shapes (32x32, 8 epochs, batch 128), each with the
conv-BN net and the no-BN net converted to weight-normalised layers. Runs go to ``--root``
(default ``runs/study``), one sweep folder per benchmark/net/contender; ``--jobs 2`` runs two at a
time with one CPU thread each.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from sgdph_tools.recipe import load_yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

BENCHMARKS = {  # name: (lrs of the SGD-type optimizers, SGDM's weight decays)
    "shapes": ("0.2,0.4,0.8", "5e-4,5e-3"),
    "digits": ("0.025,0.05,0.1", "5e-4,5e-3"),
}
NETS = ("small_cnn", "small_cnn_nobn_wn")

# contender: (recipe suffix, fixed overrides, the contender's own knob besides lr; None: weight decay)
CONTENDERS = {
    "sgd": ("sgd", [], None),
    # SGDM as timm's factory builds it by default (filter_bias_and_bn): no weight decay on 1-D parameters
    "sgd-no1dwd": ("sgd", ["optimizer.weight_decay_1d=0"], None),
    # SGD-PH with the curvature switched off (r = 1/(1 + D/1e6) ≈ 1): SGDM except that the 1-D parameters'
    # weight decay is added after the step, not through the momentum buffer -- the control of the study
    "ph-nocurvature": ("sgdph", ["optimizer.rule=damped", "optimizer.eps=1e6"], None),
    "adamw": ("adamw", [], None),
    "ph-rowsum-paper": ("sgdph", [], "optimizer.so_lr=0.001,0.01"),
    "ph-rowsum-damped": ("sgdph", ["optimizer.rule=damped"], "optimizer.eps=0.03,0.3"),
    "ph-rowsum-normalized": ("sgdph", ["optimizer.rule=normalized"], "optimizer.eps=0.3,1"),
    "ph-gnb-normalized": (
        "sgdph",
        ["optimizer.rule=normalized", "optimizer.estimator=gnb", "optimizer.gnb_fraction=0.25"],
        "optimizer.eps=0.3,1",
    ),
    # SGD-PH without weight decay on the 1-D parameters: does the curvature add anything once neither
    # SGD-PH nor SGDM (sgd-no1dwd) decays the gammas?
    "ph-gnb-normalized-no1dwd": (
        "sgdph",
        [
            "optimizer.rule=normalized",
            "optimizer.estimator=gnb",
            "optimizer.gnb_fraction=0.25",
            "optimizer.weight_decay_1d=0",
        ],
        "optimizer.eps=0.3,1",
    ),
    "ph-gnb-paper": (
        "sgdph",
        ["optimizer.estimator=gnb", "optimizer.gnb_fraction=0.25"],
        "optimizer.so_lr=0.001,0.01",
    ),
    "ph-hutchinson-normalized": (
        "sgdph",
        ["optimizer.rule=normalized", "optimizer.estimator=hutchinson"],
        "optimizer.eps=0.3,1",
    ),
    "ph-hutchinson-paper": ("sgdph", ["optimizer.estimator=hutchinson"], "optimizer.so_lr=0.001,0.01"),
    # the default mode (GNB-normalized, a quarter of the batch) refreshed every k steps, not every step
    **{
        f"ph-gnb-normalized-k{k}": (
            "sgdph",
            [
                "optimizer.rule=normalized",
                "optimizer.estimator=gnb",
                "optimizer.gnb_fraction=0.25",
                f"optimizer.hessian_every={k}",
            ],
            "optimizer.eps=0.3,1",
        )
        for k in (2, 5, 10)
    },
    # block_newton's cheap mode (per-example GNB blocks on a quarter of the batch, every 10 steps like the
    # default mode); its own knob: τ, the Newton direction's scale (ε 1e-3: its calibration on shapes no-BN)
    "ph-block-newton": (
        "sgdph",
        [
            "optimizer.rule=block_newton",
            "optimizer.estimator=gnb",
            "optimizer.gnb_fraction=0.25",
            "optimizer.hessian_every=10",
            "optimizer.eps=0.001",
        ],
        "optimizer.so_lr=0.003,0.01",
    ),
    # the same blocks at SGD's step length per tensor (ε relative to the block's mean diagonal): does the block's
    # direction help once the Newton step's size (0.03-6x SGD's across tensors under block_newton) is taken out?
    "ph-block-normalized": (
        "sgdph",
        [
            "optimizer.rule=block_normalized",
            "optimizer.estimator=gnb",
            "optimizer.gnb_fraction=0.25",
            "optimizer.hessian_every=10",
        ],
        "optimizer.eps=0.01,0.1",
    ),
    # the block-diagonal Hessian-free baseline (issue 25): lr 1 (the solved step itself, its recipes' value);
    # its step-size knob is the initial damping λ (then adapted by Levenberg-Marquardt), tuned with weight decay
    "block-hf": ("block_hf", [], None),
}
#: the axis a contender's step size is tuned on, which stage 1 extends past its grid's edge
STEP_AXIS = {"block-hf": "optimizer.damping"}
DAMPINGS = "0.1,1,10"
#: block-hf's weight decay is an L2 term of the objective its Newton step minimises: where a weight's loss
#: curvature is below λ + w the step takes the term's minimiser (zero) almost at once -- with the SGD family's
#: 5e-4 and 5e-3, every weight of the no-BN shapes net was ~1e-20 within two epochs (all six configurations at
#: chance). Its grid is Martens' (2010) L2 coefficient, 2e-5, and none.
HF_WEIGHT_DECAYS = "0,2e-5"


def sweeps(root: Path) -> list[tuple[str, Path, list[str]]]:
    """(sweep folder name, recipe, stage-1 axes) for every benchmark x net x contender."""
    out = []
    for bench, (lrs, wds) in BENCHMARKS.items():
        for net in NETS:
            for contender, (suffix, fixed, knob) in CONTENDERS.items():
                recipe = RECIPES / bench / f"{bench}_{net}_{suffix}.yaml"
                if contender == "adamw":
                    axes = ["optimizer.lr=0.001,0.003,0.01", "optimizer.weight_decay=0.01,0.1"]
                elif contender in STEP_AXIS:
                    axes = [*fixed, f"{STEP_AXIS[contender]}={DAMPINGS}", f"optimizer.weight_decay={HF_WEIGHT_DECAYS}"]
                else:
                    # the fixed overrides come first: that is the order the study's runs were named in
                    axes = [*fixed, f"optimizer.lr={lrs}", knob or f"optimizer.weight_decay={wds}"]
                out.append((f"{bench}-{net}/{contender}", recipe, axes))
    return out


def sweep_command(recipe: Path, axes: list[str], seeds: str, folder: Path, jobs: int) -> list[str]:
    return ["sgdph", "sweep", str(recipe), *axes, "--seeds", seeds, "--jobs", str(jobs), "--dir", str(folder)]


def in_grid(config: dict, axes: list[str]) -> bool:
    """Whether a run's configuration is one of the grid's (a folder may hold runs of an older grid)."""
    for axis in axes:
        key, values = axis.split("=", 1)
        if config.get(key) not in [load_yaml(v) for v in values.split(",")]:
            return False
    return True


def lr_extension(axes: list[str], config: dict) -> list[str] | None:
    """The axes of one more step-size step (lr; the damping for block-hf, ``STEP_AXIS``) past the
    grid's edge when ``config`` (the grid's choice) sits on it; None when it is inside."""
    key = "optimizer.lr" if any(a.startswith("optimizer.lr=") for a in axes) else "optimizer.damping"
    index = next(i for i, a in enumerate(axes) if a.startswith(f"{key}="))
    lrs = [load_yaml(v) for v in axes[index].split("=", 1)[1].split(",")]
    ratio = lrs[1] / lrs[0]
    if config[key] == max(lrs):
        step = max(lrs) * ratio
    elif config[key] == min(lrs):
        step = min(lrs) / ratio
    else:
        return None
    return [*axes[:index], f"{key}={step:.4g}", *axes[index + 1 :]]


def stage1_grids(folder: Path, axes: list[str]) -> list[list[str]]:
    """The stage-1 grid, and its lr extension when the grid's choice sits on an edge."""
    first = chosen(folder, [axes])
    extension = lr_extension(axes, first) if first is not None else None
    return [axes] if extension is None else [axes, extension]


def chosen(folder: Path, grids: list[list[str]]) -> dict | None:
    """The stage-1 configuration chosen on validation: among the grid's seed-0 runs, the one with the
    highest top-1 on the validation split at its last epoch (ties: the lower validation loss);
    diverged runs are not chosen."""
    manifest = folder / "sweep.json"
    if not manifest.is_file():
        return None
    runs = [
        r
        for r in json.loads(manifest.read_text())["records"]
        if r["seed"] == 0 and r["status"] == "done" and any(in_grid(r["config"], axes) for axes in grids)
    ]
    if not runs:
        return None
    return max(runs, key=lambda r: (r["final"]["val_acc1"], -r["final"]["val_loss"]))["config"]


def stage2_axes(stage1_axes: list[str], config: dict) -> list[str]:
    """The stage-1 axes, each narrowed to the chosen value."""
    axes = []
    for axis in stage1_axes:
        key = axis.split("=", 1)[0]
        axes.append(f"{key}={config[key]}" if key in config else axis)
    return axes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["plan", "run", "tables"])
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1)
    parser.add_argument("--only", nargs="*", help="sweep folder names (e.g. shapes-small_cnn/sgd); default: all")
    parser.add_argument("--root", type=Path, default=Path("runs/study"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", default="1-3", help="stage 2's seeds (seed 0 is stage 1's run)")
    args = parser.parse_args()
    selected = [s for s in sweeps(args.root) if not args.only or s[0] in args.only]
    if args.action == "tables":
        from study_tables import print_tables  # benchmarks/study_tables.py

        print_tables(args.root, [s[0] for s in selected])
        return
    for name, recipe, axes in selected:
        folder = args.root / name
        if args.stage == 1:
            command = sweep_command(recipe, axes, "0", folder, args.jobs)
            print(shlex.join(command), flush=True)
            if args.action == "run":
                subprocess.run(command, check=False)
            extension = stage1_grids(folder, axes)[1:]
            if not extension:
                continue
            command = sweep_command(recipe, extension[0], "0", folder, args.jobs)
        else:
            config = chosen(folder, stage1_grids(folder, axes))
            if config is None:
                print(f"# {name}: no stage-1 result yet", file=sys.stderr)
                continue
            command = sweep_command(recipe, stage2_axes(axes, config), args.seeds, folder, args.jobs)
        print(shlex.join(command), flush=True)
        if args.action == "run":
            subprocess.run(command, check=False)


if __name__ == "__main__":
    main()
