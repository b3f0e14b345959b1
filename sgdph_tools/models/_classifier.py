"""The classifier interface timm's models share, for this project's simple conv nets."""

from __future__ import annotations

import torch
import torch.nn as nn


class PooledClassifier(nn.Module):
    """``features`` (set by the subclass), global average pooling, dropout and a linear classifier,
    with timm's interface: ``forward_features``, ``forward_head``, ``get_classifier``,
    ``reset_classifier``, ``num_classes``, ``num_features``."""

    features: nn.Module

    def _init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
