"""Small real networks shared by the tests."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile


def conv_bn_net(act: type[nn.Module] = nn.ReLU, num_classes: int = 3, dropout: float = 0.0) -> nn.Sequential:
    """conv-BN-act-conv-BN-act-pool-linear, the paper's setting in miniature."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        act(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        act(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(6, num_classes),
    )


def ln_mlp(act: type[nn.Module] = nn.GELU, num_classes: int = 3, dropout: float = 0.0) -> nn.Sequential:
    """A pre-activation transformer-style MLP: linear-LayerNorm-act-linear-LayerNorm-act-linear."""
    return nn.Sequential(
        nn.Linear(5, 8),
        nn.LayerNorm(8),
        act(),
        nn.Dropout(dropout),
        nn.Linear(8, 7),
        nn.LayerNorm(7),
        act(),
        nn.Linear(7, num_classes),
    )


def batch_for(net: nn.Module, n: int = 8, num_classes: int = 3, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    is_conv = any(isinstance(m, nn.Conv2d) for m in net.modules())
    shape = (n, 2, 5, 5) if is_conv else (n, 5)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, num_classes, (n,), generator=g)


def unused_port() -> int:
    """A TCP port nothing listens on now (for torch.distributed's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distinct_ports(n: int) -> list[int]:
    """``n`` different TCP ports nothing listens on now (held open together while chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def join_gloo(rank: int, port: int, world: int) -> None:
    """In a spawned test worker: one CPU thread, and the gloo process group on localhost:port. A
    collective that waits past 5 minutes raises (gloo's default is 30): a stuck peer fails the test
    instead of holding the suite."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))


@pytest.fixture
def free_port() -> int:
    return unused_port()


class _ReadsWithoutScalarOp(torch.overrides.TorchFunctionMode):
    """Counts the host reads that the profiler does not show as ``aten::_local_scalar_dense``."""

    NAMES = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.NAMES
        return func(*args, **(kwargs or {}))


def host_reads(fn) -> int:
    """Every ``.item()``, ``bool()``, ``float()`` of a tensor, and every read inside an aten operator, is
    one ``aten::_local_scalar_dense`` (counted with torch's profiler); ``tolist()``, ``numpy()`` and
    ``cpu()`` are counted at the Python level. On a GPU each is a host-device synchronisation."""
    with profile(activities=[ProfilerActivity.CPU]) as prof, _ReadsWithoutScalarOp() as python_level:
        fn()
    return sum(e.name == "aten::_local_scalar_dense" for e in prof.events()) + python_level.count
