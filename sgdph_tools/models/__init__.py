"""Model definitions registered with timm (importing this package registers them)."""

from . import cifar, small  # noqa: F401  (register the models with timm)

#: The models this project registers with timm.
REGISTERED = (
    "small_cnn",
    "small_cnn_nobn",
    "resnet18_cifar",
    "resnet50_cifar",
    "vgg11_cifar",
    "vgg19_cifar",
    "vgg11_nobn",
    "vgg19_nobn",
)
