"""Convert a zoo of timm and torchvision models and print the table in docs/surgery.md.

    python benchmarks/surgery_zoo.py

For each model: conv/linear layers, how many were decoupled, already normalised (feed a norm),
weight-standardised, not convertible (with the reason), how the decisions were made, and the
verification error. Models are built with 10 classes and random weights (nothing is downloaded).
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from sgdph_tools.models.factory import ModelSpec, create_model
from sgdph_tools.surgery.rewrite import (
    DECOUPLED,
    NORMALISED,
    NOT_CONVERTIBLE,
    WEIGHT_STANDARDISED,
    convert,
    example_input_for,
)

ZOO = [
    ("resnet18", {}, 64),
    ("resnet50d", {}, 64),
    ("vgg11", {}, 64),
    ("vgg11_bn", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("tf_efficientnet_b0", {}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("ghostnet_100", {}, 64),
    ("regnetx_002", {}, 64),
    ("densenet121", {}, 64),
    ("repvgg_a0", {}, 64),
    ("cspresnet50", {}, 64),
    ("convnext_atto", {}, 64),
    ("edgenext_xx_small", {}, 64),
    ("poolformer_s12", {}, 64),
    ("nf_resnet26", {}, 64),
    ("dm_nfnet_f0", {}, 64),
    ("vit_tiny_patch16_224", {}, 224),
    ("deit_tiny_patch16_224", {}, 224),
    ("eva02_tiny_patch14_224", {}, 224),
    ("swin_tiny_patch4_window7_224", {}, 224),
    ("levit_128s", {}, 224),
    ("xcit_nano_12_p16_224", {}, 224),
    ("coatnet_nano_rw_224", {}, 224),
    ("mobilevit_xxs", {}, 64),
    ("hiera_tiny_224", {}, 224),
    ("nest_tiny", {}, 224),
    ("mixer_b16_224", {}, 224),
    ("resnet18_cifar", {}, 32),
    ("resnet50_cifar", {}, 32),
    ("vgg11_cifar", {}, 32),
    ("vgg19_cifar", {}, 32),
    ("vgg11_nobn", {}, 32),
    ("vgg19_nobn", {}, 32),
    ("torchvision:resnet18", {}, 64),
    ("torchvision:vgg11", {}, 64),
    ("torchvision:mobilenet_v3_small", {}, 64),
    ("torchvision:efficientnet_b0", {}, 64),
    ("torchvision:convnext_tiny", {}, 64),
    ("torchvision:swin_t", {}, 64),
    ("torchvision:vit_b_16", {}, 224),
]


def main() -> None:
    torch.set_num_threads(2)
    print(
        "| model | conv/linear | decoupled | already normalised | weight-standardised | not convertible | "
        "decided by | max output error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, kwargs, size in ZOO:
        start = time.perf_counter()
        spec = ModelSpec.parse(name, num_classes=10, **kwargs)
        model = create_model(spec)
        try:
            model, report = convert(model, example_input=example_input_for(model, size))
        except Exception as exc:  # noqa: BLE001 -- report, do not stop the table
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:80]} |||||||")
            continue
        c = report.counts()
        evidence = ", ".join(f"{k} {v}" for k, v in Counter(layer.evidence for layer in report.layers).most_common())
        reasons = sorted({layer.detail.split(":")[0] for layer in report.layers if layer.action == NOT_CONVERTIBLE})
        bad = f"{c.get(NOT_CONVERTIBLE, 0)}" + (f" ({'; '.join(reasons)})" if reasons else "")
        print(
            f"| {name} | {len(report.layers)} | {c.get(DECOUPLED, 0)} | {c.get(NORMALISED, 0)} | "
            f"{c.get(WEIGHT_STANDARDISED, 0)} | {bad} | {evidence} | {report.max_abs_error:.1g} |",
            flush=True,
        )
        del model
        _ = time.perf_counter() - start


if __name__ == "__main__":
    main()
