"""The trainer behind ``sgdph train``: recipes in, metrics, curves and checkpoints out."""

from .trainer import Trainer

__all__ = ["Trainer"]
