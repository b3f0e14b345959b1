"""Building a model by name: timm's registry (this project's models included) or torchvision's.

Names: ``resnet18`` (timm), ``vgg19_nobn`` (registered here), ``torchvision:resnet50`` or
``tv:resnet50`` (torchvision). An unknown name is a :class:`~sgdph_tools.errors.UserError` that
suggests the closest valid names. Nothing is downloaded: weights are random unless a checkpoint is
loaded afterwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch.nn as nn

from ..errors import UserError, did_you_mean
from . import REGISTERED  # noqa: F401  (importing the package registers this project's models)

TORCHVISION_PREFIXES = ("torchvision:", "tv:")


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: its source, name and constructor kwargs."""

    name: str
    source: str = "timm"  # "timm" or "torchvision"
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, **kwargs) -> ModelSpec:
        for prefix in TORCHVISION_PREFIXES:
            if name.startswith(prefix):
                return cls(name[len(prefix) :], "torchvision", kwargs)
        return cls(name, "timm", kwargs)

    @property
    def display_name(self) -> str:
        return self.name if self.source == "timm" else f"torchvision:{self.name}"

    def as_dict(self) -> dict:
        return asdict(self)


def _torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models()


def check_model_name(spec: ModelSpec) -> None:
    if spec.source == "torchvision":
        names = _torchvision_models()
        if spec.name not in names:
            raise UserError(f"unknown torchvision model '{spec.name}'{did_you_mean(spec.name, names)}")
        return
    if not timm.is_model(spec.name):
        candidates = timm.list_models() + [f"torchvision:{n}" for n in _torchvision_models()]
        raise UserError(
            f"unknown model '{spec.name}'{did_you_mean(spec.name, candidates)} "
            f"(timm names, this project's {', '.join(REGISTERED[:3])}..., or torchvision:NAME)"
        )


def create_model(spec: ModelSpec) -> nn.Module:
    """Build the model described by ``spec`` (random weights)."""
    check_model_name(spec)
    try:
        if spec.source == "torchvision":
            import torchvision

            return torchvision.models.get_model(spec.name, weights=None, **spec.kwargs)
        return timm.create_model(spec.name, pretrained=False, **spec.kwargs)
    except TypeError as exc:  # an option the architecture does not take (e.g. img_size for a CNN)
        raise UserError(f"cannot build '{spec.display_name}' with {spec.kwargs}: {exc}") from exc


def create_model_for_size(spec: ModelSpec, img_size: int | None) -> nn.Module:
    """Build the model; with ``img_size``, pass it to architectures that take one (timm's ViTs and
    friends fix their input size at construction) and record it in ``spec.kwargs``."""
    if img_size is None or spec.source != "timm" or "img_size" in spec.kwargs:
        return create_model(spec)
    sized = ModelSpec(spec.name, spec.source, {**spec.kwargs, "img_size": img_size})
    try:
        model = create_model(sized)
    except UserError as exc:
        if "img_size" not in str(exc):
            raise
        return create_model(spec)  # a CNN: any input size works
    spec.kwargs = sized.kwargs
    return model
