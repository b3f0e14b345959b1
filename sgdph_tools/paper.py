"""The paper's experiments (Tables 1-4) as data, and the recipe files generated from them.

    python -m sgdph_tools.paper        # (re)writes recipes/{cifar,mini-imagenet,imagenet,vgg19-nobn}/

One place holds the hyperparameters the paper reports (Section 4); ``tests/test_paper.py`` checks
that the files in ``recipes/`` are exactly what this module generates, so they cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import yaml

# Reported test accuracies (%), mean ± std over 4 runs (Table 3: single runs).
TABLE1 = {  # (dataset, model) -> optimizer -> accuracy
    ("cifar100", "resnet18"): dict(
        sgd="77.20 ± .30",
        adam="72.95 ± .20",
        adamw="77.23 ± .10",
        adabelief="77.43 ± .36",
        adahessian="76.73 ± .23",
        apollo="76.63 ± .27",
        sgdph="77.96 ± .30",
    ),
    ("cifar100", "resnet50"): dict(
        sgd="77.78 ± .43",
        adam="72.13 ± .53",
        adamw="78.10 ± .17",
        adabelief="79.08 ± .23",
        adahessian="78.48 ± .22",
        apollo="78.68 ± .11",
        sgdph="79.54 ± .27",
    ),
    ("cifar100", "vgg11"): dict(
        sgd="70.80 ± .29",
        adam="68.00 ± .21",
        adamw="71.20 ± .29",
        adabelief="72.43 ± .16",
        adahessian="67.78 ± .34",
        apollo="70.05 ± .11",
        sgdph="72.75 ± .13",
    ),
    ("cifar100", "vgg19"): dict(
        sgd="70.94 ± .32",
        adam="63.90 ± 1.62",
        adamw="70.26 ± .23",
        adabelief="72.37 ± .19",
        adahessian="69.93 ± .84",
        apollo="71.46 ± .52",
        sgdph="73.87 ± .28",
    ),
    ("cifar10", "resnet18"): dict(
        sgd="95.10 ± .07",
        adam="92.95 ± .25",
        adamw="94.80 ± .10",
        adabelief="95.12 ± .14",
        adahessian="94.70 ± .15",
        apollo="95.03 ± .12",
        sgdph="95.04 ± .07",
    ),
    ("cifar10", "resnet50"): dict(
        sgd="94.75 ± .30",
        adam="92.62 ± .19",
        adamw="94.72 ± .10",
        adabelief="95.35 ± .05",
        adahessian="95.35 ± .11",
        apollo="95.27 ± .11",
        sgdph="95.22 ± .07",
    ),
    ("cifar10", "vgg11"): dict(
        sgd="92.17 ± .19",
        adam="90.75 ± .15",
        adamw="92.02 ± .08",
        adabelief="92.45 ± .18",
        adahessian="91.85 ± .16",
        apollo="92.38 ± .19",
        sgdph="92.60 ± .08",
    ),
    ("cifar10", "vgg19"): dict(
        sgd="93.57 ± .13",
        adam="92.19 ± .07",
        adamw="93.54 ± .28",
        adabelief="93.72 ± .08",
        adahessian="93.68 ± .14",
        apollo="93.76 ± .07",
        sgdph="93.75 ± .10",
    ),
}
TABLE2 = {  # mini-ImageNet
    "resnet18": dict(
        sgd="67.33 ± .17",
        adam="66.47 ± .34",
        adamw="66.90 ± .36",
        adabelief="67.98 ± .29",
        adahessian="67.13 ± .40",
        apollo="68.06 ± .38",
        sgdph="70.53 ± .32",
    ),
    "resnet50": dict(
        sgd="67.09 ± .56",
        adam="65.70 ± .60",
        adamw="68.23 ± .30",
        adabelief="69.36 ± .13",
        adahessian="70.25 ± .28",
        apollo="70.24 ± .28",
        sgdph="72.17 ± .30",
    ),
}
TABLE3 = dict(sgd="70.49", apollo="70.39", sgdph="70.59")  # ImageNet, ResNet-18
TABLE4 = dict(sgd="65.56 ± .41", sgd_wn="65.98 ± .35", sgdph_wn="67.93 ± .35")  # CIFAR-100, VGG-19 without BN

# (lr, weight decay) per optimizer.
CIFAR_HPARAMS = dict(
    sgdph=(0.01, 5e-3),
    sgd=(0.1, 5e-4),
    adam=(1e-3, 5e-4),
    adamw=(1e-3, 0.5),
    adabelief=(1e-3, 0.5),
    adahessian=(0.15, 5e-4),
    apollo=(1.0, 2.5e-4),
)
MINI_HPARAMS = dict(
    sgdph=(0.05, 1e-3),
    sgd=(0.1, 1e-4),
    adam=(1e-3, 1e-4),
    adamw=(1e-3, 0.1),
    adabelief=(1e-3, 0.1),
    adahessian=(0.15, 5e-4),
    apollo=(1.0, 1e-4),
)
IMAGENET_HPARAMS = dict(sgdph=(0.1, 1e-4), sgd=(0.1, 1e-4), apollo=(1.0, 1e-4))
TABLE4_HPARAMS = dict(
    sgd=("sgd", False, 0.01, 1e-4), sgd_wn=("sgd", True, 0.01, 1e-4), sgdph_wn=("sgdph", True, 0.01, 1e-3)
)

CIFAR_MODELS = dict(resnet18="resnet18_cifar", resnet50="resnet50_cifar", vgg11="vgg11_cifar", vgg19="vgg19_cifar")
NAMES = dict(
    sgdph="SGD-PH",
    sgd="SGDM",
    adam="Adam",
    adamw="AdamW",
    adabelief="AdaBelief",
    adahessian="AdaHessian",
    apollo="Apollo",
    sgd_wn="SGDM+WN",
    sgdph_wn="SGD-PH+WN",
)


def _optimizer(name: str, lr: float, weight_decay: float) -> dict:
    opt = {"name": name, "lr": lr, "weight_decay": weight_decay}
    if name in ("sgdph", "sgd"):
        opt["momentum"] = 0.9
    if name == "sgdph":  # the paper's tau_SO, alpha, eps (Section 4, "Experiments Setup")
        opt.update(so_lr=1e-3, hessian_momentum=0.9, eps=1e-4, estimator="rowsum", engine="autograd", rule="paper")
    return opt


def _recipe(
    path: str,
    title: str,
    reported: str,
    model: dict,
    data: dict,
    optimizer: dict,
    schedule: dict,
    trainer: dict,
    notes: str = "",
) -> tuple[str, str]:
    # The paper trained on the whole training set: no validation split, the last epoch is reported.
    data = {**data, "val_fraction": 0.0}
    body = yaml.safe_dump(
        {"model": model, "data": data, "optimizer": optimizer, "schedule": schedule, "trainer": trainer},
        sort_keys=False,
    )
    header = (
        f"# sgdph train {path}\n# {title}. Reported in the paper: {reported}% top-1.\n"
        "# The whole training set, as the paper (data.val_fraction: 0): the last epoch is reported.\n"
    )
    if notes:
        header += "".join(f"# {line}\n" for line in notes.splitlines())
    return path, header + body


def paper_recipes() -> list[tuple[str, str]]:
    """(relative path, file text) for every paper recipe."""
    out = []
    cifar_schedule = {"name": "multistep", "milestones": [60, 120, 180], "gamma": 0.1}
    cifar_trainer = {"epochs": 200, "batch_size": 128, "seed": 0}
    for (dataset, arch), reported in TABLE1.items():
        for opt, (lr, wd) in CIFAR_HPARAMS.items():
            out.append(
                _recipe(
                    f"recipes/cifar/{dataset}_{arch}_{opt}.yaml",
                    f"Table 1: {dataset.upper().replace('CIFAR', 'CIFAR-')}, {arch}, {NAMES[opt]} "
                    "(200 epochs, batch 128, lr x0.1 every 60)",
                    reported[opt],
                    {"name": CIFAR_MODELS[arch]},
                    {"name": dataset, "root": "data", "num_workers": 4},
                    _optimizer(opt, lr, wd),
                    cifar_schedule,
                    cifar_trainer,
                    "Needs the dataset under data/ (add data.download=true on a machine with internet).",
                )
            )
    for key, (opt, wn, lr, wd) in TABLE4_HPARAMS.items():
        out.append(
            _recipe(
                f"recipes/vgg19-nobn/cifar100_vgg19_nobn_{key}.yaml",
                f"Table 4: CIFAR-100, VGG-19 without BN, {NAMES[key]}",
                TABLE4[key],
                {"name": "vgg19_nobn", "conversion": {"wn": wn}},
                {"name": "cifar100", "root": "data", "num_workers": 4},
                _optimizer(opt, lr, wd),
                cifar_schedule,
                cifar_trainer,
                "With BN (SGDM+BN 70.94, SGD-PH+BN 73.87) see recipes/cifar/cifar100_vgg19_{sgd,sgdph}.yaml."
                + (
                    "\nmodel.conversion.wn decouples every conv/linear into gamma * V/||V|| + bias "
                    "(sgdph convert --wn)."
                    if wn
                    else ""
                ),
            )
        )
    mini_schedule = {"name": "multistep", "milestones": [30, 60, 90], "gamma": 0.1}
    for arch, reported in TABLE2.items():
        for opt, (lr, wd) in MINI_HPARAMS.items():
            out.append(
                _recipe(
                    f"recipes/mini-imagenet/miniimagenet_{arch}_{opt}.yaml",
                    f"Table 2: mini-ImageNet, {arch}, {NAMES[opt]} (100 epochs, batch 128, 224x224, lr x0.1 every 30)",
                    reported[opt],
                    {"name": arch},
                    {"name": "imagefolder", "root": "data/mini-imagenet", "img_size": 224, "num_workers": 8},
                    _optimizer(opt, lr, wd),
                    mini_schedule,
                    {"epochs": 100, "batch_size": 128, "seed": 0},
                    "Expects data/mini-imagenet/{train,val}/<class>/<image>: 100 classes, 500 train and 100 test\n"
                    "images each (the split of Ravi & Larochelle). The paper trained on 4 GPUs: add --nproc 4.",
                )
            )
    for opt, (lr, wd) in IMAGENET_HPARAMS.items():
        out.append(
            _recipe(
                f"recipes/imagenet/imagenet_resnet18_{opt}.yaml",
                f"Table 3: ImageNet, resnet18, {NAMES[opt]} (100 epochs, batch 256, lr x0.1 every 30)",
                TABLE3[opt],
                {"name": "resnet18"},
                {"name": "imagefolder", "root": "data/imagenet", "img_size": 224, "num_workers": 8},
                _optimizer(opt, lr, wd),
                mini_schedule,
                {"epochs": 100, "batch_size": 256, "seed": 0},
                "Expects data/imagenet/{train,val}/<class>/<image>. The paper trained on 4 GPUs: add --nproc 4.",
            )
        )
    return out


def write_recipes(root: Path) -> list[Path]:
    written = []
    for relative, text in paper_recipes():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    paths = write_recipes(Path.cwd())
    print(f"wrote {len(paths)} recipes")
