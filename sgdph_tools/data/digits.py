"""scikit-learn's handwritten digits: 1,797 8x8 grey images of 10 classes, shipped inside
scikit-learn, so they work on any machine without a download."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The digits' pixel values are integers in [0, 16]; scaled to [0, 1] they have about this mean/std.
DIGITS_MEAN, DIGITS_STD = 0.3, 0.4
NUM_CLASSES = 10


def digits_tensors(img_size: int = 8, test_fraction: float = 0.25, split_seed: int = 0):
    """The digits as normalised float tensors, split into a fixed stratified train/test split.

    Returns ``(x_train, y_train, x_test, y_test)`` with images shaped ``(N, 1, img_size, img_size)``
    (bilinear resize from 8x8 when ``img_size != 8``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if img_size != 8:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x - DIGITS_MEAN) / DIGITS_STD
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=split_seed, stratify=y.numpy()
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]
