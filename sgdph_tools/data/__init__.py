"""Datasets."""

from .digits import digits_tensors

__all__ = ["digits_tensors"]
