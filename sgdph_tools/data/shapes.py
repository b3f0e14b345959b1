"""``shapes``: a generated 10-class image task, harder than digits, the same on every machine.

Each image (RGB, default 32x32) holds one shape -- the class -- drawn from a signed distance on the
pixel grid: disc, ring, square, square outline, half disc, cross, triangle, ellipse, T, two dots. Every
image draws its own centre, size, rotation, stroke, foreground and background colour, a smooth
background gradient and pixel noise, so colour and position say nothing about the class and the
shape must be recognised under rotation and scale. Nothing is downloaded: the images are generated
from a seed in a second (fixed seeds for the train and test sets), and the train/test split comes
from separate generators, so the test images are new draws of the same distribution.
"""

from __future__ import annotations

import math

import torch

NUM_CLASSES = 10
# Shapes that no rotation or scaling turns into one another (a "+" would be an "x" turned 45 degrees).
CLASS_NAMES = ("disc", "ring", "square", "square outline", "half disc", "cross", "triangle", "ellipse", "T", "two dots")
TRAIN_SEED, TEST_SEED = 20261125, 20261126


def _distance(kind: int, u: torch.Tensor, v: torch.Tensor, size: torch.Tensor, stroke: torch.Tensor) -> torch.Tensor:
    """A map that is <= 0 inside shape ``kind``; ``u, v`` are the rotated coordinates centred on the
    shape ([N, H, W]), ``size`` and ``stroke`` are per image ([N, 1, 1])."""
    au, av, radius = u.abs(), v.abs(), torch.sqrt(u**2 + v**2)
    if kind == 0:  # disc
        return radius - size
    if kind == 1:  # ring
        return (radius - 0.75 * size).abs() - stroke
    if kind == 2:  # square
        return torch.maximum(au, av) - size
    if kind == 3:  # square outline
        return (torch.maximum(au, av) - size).abs() - stroke
    if kind == 4:  # half disc
        return torch.maximum(radius - size, -v)
    if kind == 5:  # cross
        return torch.maximum(torch.minimum(au, av) - stroke, torch.maximum(au, av) - size)
    if kind == 6:  # triangle, pointing up
        return torch.maximum(v - 0.5 * size, (math.sqrt(3) * au - v) / 2 - 0.5 * size)
    if kind == 7:  # ellipse
        return torch.sqrt(u**2 + (v / 0.45) ** 2) - size
    if kind == 8:  # T: a bar on a stem
        bar = torch.maximum(au - size, (v - 0.7 * size).abs() - stroke)
        return torch.minimum(bar, torch.maximum(au - stroke, torch.maximum(v - 0.7 * size, -size - v)))
    # two dots
    return (
        torch.minimum(torch.sqrt((u - 0.55 * size) ** 2 + v**2), torch.sqrt((u + 0.55 * size) ** 2 + v**2))
        - 0.35 * size
    )


def generate(
    n: int, img_size: int = 32, seed: int = TRAIN_SEED, noise: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 3, img_size, img_size]`` (roughly zero mean, unit scale) and their labels,
    balanced over the classes (``n`` rounded down to a multiple of 10), in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    per_class = n // NUM_CLASSES
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    m = len(labels)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(m, 1, 1, generator=g)

    size, stroke = uniform(0.35, 0.6), uniform(0.1, 0.16)
    cx, cy = uniform(-0.9, 0.9) * (1 - size), uniform(-0.9, 0.9) * (1 - size)
    angle = uniform(0, 2 * math.pi)
    axis = torch.linspace(-1, 1, img_size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    dx, dy = x - cx, y - cy
    u = torch.cos(angle) * dx + torch.sin(angle) * dy
    v = -torch.sin(angle) * dx + torch.cos(angle) * dy
    distance = torch.empty_like(u)
    for kind in range(NUM_CLASSES):
        mine = labels == kind
        distance[mine] = _distance(kind, u[mine], v[mine], size[mine], stroke[mine])
    inside = torch.sigmoid(-distance * img_size / 1.5)  # anti-aliased edge

    bg = 0.25 + 0.5 * torch.rand(m, 3, 1, 1, generator=g)
    # The shape stays visible: brighter or darker than the background (one sign per image) by 0.25-0.45
    # in every channel, so colour carries no class information but the edge is always there.
    sign = torch.randint(0, 2, (m, 1, 1, 1), generator=g) * 2 - 1
    fg = bg + sign * (0.25 + 0.2 * torch.rand(m, 3, 1, 1, generator=g))
    slope = torch.randn(m, 3, 2, generator=g) * 0.15
    gradient = slope[..., 0, None, None] * x + slope[..., 1, None, None] * y
    images = bg + gradient + (fg - bg) * inside.unsqueeze(1)
    images = images + noise * torch.randn(m, 3, img_size, img_size, generator=g)
    return ((images - 0.5) / 0.3).float(), labels


def shapes_tensors(num_train: int = 20000, num_test: int = 2000, img_size: int = 32, noise: float = 0.15):
    """``(x_train, y_train, x_test, y_test)``: train and test from their own fixed seeds."""
    x_train, y_train = generate(num_train, img_size, TRAIN_SEED, noise)
    x_test, y_test = generate(num_test, img_size, TEST_SEED, noise)
    return x_train, y_train, x_test, y_test
