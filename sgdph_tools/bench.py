"""Step time and peak memory of SGD-PH's modes against SGDM, AdamW and timm's Adahessian.

Each configuration runs in its own child process (forked from a server that imported torch once, so
no configuration inherits another's allocations): it builds the model and optimizer, records its
memory before the first step, runs warm-up steps (whole refresh cycles: one on a CPU, up to at least
10 steps on a GPU), then times windows of steps -- forward + backward + step.

Every mode is timed the same way: over windows of ``window`` consecutive steps, the clock read (and a
GPU synchronised) only at a window's ends, as a training loop that does not wait for the GPU every
step; the time per step is the median over windows of the window's time / ``window``. The window is
a multiple of every measured ``hessian_every``, so each window holds whole refresh cycles and the
refresh steps count in their real proportion. ``rowsum`` refreshes one tensor per refreshing step, in
a round robin, and the cost depends on the tensor's depth: each window starts the round robin at
another tensor, evenly spread over the cycle (before, every window continued from the first tensors,
the deepest and dearest). (An earlier version took the median of single steps for
k = 1 and the mean for k > 1: a median against a mean biased every k > 1 ratio upwards by the step
times' skew, and a synchronisation after every step charged GPU modes for launch gaps a training loop
overlaps.) Peak memory: on a GPU ``max_memory_allocated`` minus what was allocated before the first
step; on a CPU the process's peak resident memory minus its resident memory before the first step (so
the torch import does not squeeze the ratios). Ratios are to SGDM measured in the same run.

``diagonal`` is left out: one product per element is a diagnostic, not a training mode.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .curvature.capabilities import training_modes

if TYPE_CHECKING:
    from .optim import SGDPH

#: Every training mode: the HVP-based estimators on every engine, then GNB (which needs none).
#: ``diagonal`` is left out (one product per element is a diagnostic).
ESTIMATOR_ENGINES = training_modes()
#: gnb from its own forward on this fraction of the batch (the optimizer's ``gnb_fraction``).
GNB_FRACTIONS = (0.25,)


@dataclass(frozen=True)
class Mode:
    optimizer: str  # sgdm, adamw, adahessian, sgdph, block_hf
    estimator: str | None = None
    engine: str | None = None
    hessian_every: int | None = None
    gnb_fraction: float | None = None  # block_hf: its curvature mini-batch (curvature_fraction)
    # finite differences along one tensor: run the whole perturbed forward instead of reusing the
    # activations below the tensor's layer (the optimizer's default; measured against it)
    full_forward: bool = False
    rule: str | None = None  # None: SGDPH's default rule; block_newton: its block estimate
    cg_iters: int | None = None  # block_hf: CG products per block and step, at most
    compiled: str | None = None  # torch.compile's mode for the model and the update (None: eager)

    @property
    def label(self) -> str:
        return self._eager_label + (f", compiled ({self.compiled})" if self.compiled else "")

    @property
    def _eager_label(self) -> str:
        if self.optimizer == "block_hf":
            curvature = f", curvature batch x {self.gnb_fraction:g}" if self.gnb_fraction else ""
            return f"block_hf, cg {self.cg_iters}{curvature}"
        if self.optimizer != "sgdph":
            return self.optimizer
        how = [self.engine] if self.engine else [f"batch x {self.gnb_fraction:g}"] if self.gnb_fraction else []
        how += ["full forward"] if self.full_forward else []
        parts = ([self.rule] if self.rule else []) + [self.estimator] + how + [f"every {self.hessian_every}"]
        return "sgdph " + ", ".join(parts)


def all_modes(every: tuple[int, ...] = (1, 10)) -> list[Mode]:
    modes = [Mode("sgdm"), Mode("adamw"), Mode("adahessian")]
    for k in every:
        modes += [Mode("sgdph", est, eng, k) for est, eng in ESTIMATOR_ENGINES]
        modes += [Mode("sgdph", "gnb", None, k, f) for f in GNB_FRACTIONS]
        modes += [Mode("sgdph", "rowsum", "finite_difference", k, full_forward=True)]
        # block_newton's cheap mode (its exact mode costs #tensors x cg_steps GGN products a step: not a row)
        modes += [Mode("sgdph", "gnb", None, k, f, rule="block_newton") for f in GNB_FRACTIONS]
    # the block-diagonal Hessian-free baseline: its own cost, #layers x cg_iters GGN products a step
    modes += [Mode("block_hf", gnb_fraction=0.25, cg_iters=10)]
    return modes


def compiled_modes(modes: list[Mode], compile_mode: str) -> list[Mode]:
    """The modes that torch.compile can run (SGDM, AdamW, SGD-PH without double backward), compiled with
    ``compile_mode``: SGDM first, the baseline of the compiled rows."""
    from .curvature.capabilities import needs

    def compilable(m: Mode) -> bool:
        if m.optimizer in ("sgdm", "adamw"):
            return True
        exact = m.rule == "block_newton" and m.engine == "gauss_newton"
        return m.optimizer == "sgdph" and needs(m.estimator, m.engine or "autograd", m.gnb_fraction, exact).compilable

    return [replace(m, compiled=compile_mode) for m in modes if compilable(m)]


@dataclass
class Settings:
    model: str = "resnet18_cifar"
    batch: int = 128
    img_size: int = 32
    num_classes: int = 100
    steps: int = 20  # timed steps per mode: whole windows, at least one
    device: str = "cpu"
    threads: int | None = None
    window: int = 1  # steps per timed window: a multiple of every mode's hessian_every (timing_window)

    @property
    def windows(self) -> int:
        """Timed windows per mode: the whole windows in ``steps``, at least one."""
        return max(1, self.steps // self.window)


def _refresh_cycle(modes: list[Mode]) -> int:
    """The least common multiple of the modes' ``hessian_every``: whole refresh cycles of every mode."""
    return math.lcm(*(m.hessian_every or 1 for m in modes))


def timing_window(modes: list[Mode], device: str) -> int:
    """Steps per timed window: whole refresh cycles of every mode, raised to whole multiples of at
    least 10 steps on a GPU, whose per-window synchronisation would otherwise show up as launch gaps."""
    cycle = _refresh_cycle(modes)
    least = 10 if device == "cuda" else 1
    return cycle * math.ceil(least / cycle)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(mode: Mode, model):
    from timm.optim import Adahessian

    from .optim import SGDPH, BlockHessianFree, sgdph_param_groups

    if mode.optimizer == "block_hf":
        return BlockHessianFree(model, cg_max_iters=mode.cg_iters, curvature_fraction=mode.gnb_fraction)
    if mode.optimizer == "sgdm":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if mode.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if mode.optimizer == "adahessian":
        return Adahessian(model.parameters(), lr=1e-3)
    optimizer = SGDPH(
        sgdph_param_groups(model),
        lr=1e-3,
        estimator=mode.estimator,
        engine=mode.engine or "autograd",
        hessian_every=mode.hessian_every,
        gnb_fraction=mode.gnb_fraction,
        model=model,
        **({"rule": mode.rule} if mode.rule else {}),
    )
    optimizer.reuse_activations = not mode.full_forward
    return optimizer


def _measure(mode: Mode, s: Settings) -> dict:
    """Runs in a child process: time per step (ms) and peak memory (MB) above the pre-step baseline."""
    import warnings

    import timm

    import sgdph_tools  # noqa: F401  (registers the project's models)

    from .optim import SGDPH, BlockHessianFree

    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")

    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    torch.manual_seed(0)
    model = timm.create_model(s.model, num_classes=s.num_classes).to(device).train()
    channels = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]
    x = torch.randn(s.batch, channels, s.img_size, s.img_size, device=device)
    y = torch.randint(0, s.num_classes, (s.batch,), device=device)
    opt = _build(mode, model)
    net, optimizer_step = model, opt.step
    if mode.compiled:  # as trainer.compile: the model, and SGD-PH's update or torch's whole step
        net = torch.compile(model, mode=mode.compiled)
        if isinstance(opt, SGDPH):
            opt.compile_update(mode.compiled)
        else:
            optimizer_step = torch.compile(opt.step, mode=mode.compiled)

    def loss_and_logits():
        logits = net(x)
        return F.cross_entropy(logits, y), logits

    def closure():
        opt.zero_grad(set_to_none=True)
        loss, logits = loss_and_logits()
        loss.backward(create_graph=mode.optimizer == "adahessian")
        return loss, logits

    def step():
        if isinstance(opt, SGDPH):
            opt.step(loss_fn=loss_and_logits)
        elif isinstance(opt, BlockHessianFree):
            opt.step(closure)  # it calls the closure again at the new parameters
        else:
            closure()
            optimizer_step()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_mb()
    k = mode.hessian_every or 1
    # Warm-up: whole refresh cycles; on a GPU or compiled at least 10 steps (lazy CUDA init, cuDNN's
    # algorithm search, the caching allocator's first growth, compilation and CUDA-graph recording would
    # otherwise land in the timed steps).
    for _ in range(max(1, math.ceil((10 if cuda or mode.compiled else 1) / k)) * k):
        step()
    per_step = []
    for w in range(s.windows):  # run() checked that a window holds whole refresh cycles
        if mode.estimator == "rowsum":
            start_round_robin(opt, w, s.windows)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(s.window):
            step()
        if cuda:
            torch.cuda.synchronize()
        per_step.append((time.perf_counter() - start) / s.window)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    step_s = statistics.median(per_step)
    return {"step_ms": 1000 * step_s, "peak_mb": peak}


def start_round_robin(opt: SGDPH, window: int, windows: int) -> None:
    """Make rowsum's round robin start window ``window`` of ``windows`` at the tensor
    ``window * n // windows`` of its n tensors.

    rowsum refreshes one tensor per refreshing step, and what that costs depends on the tensor's depth
    (a product for a tensor near the input runs the whole backward): starting each window elsewhere,
    evenly over the cycle, makes the windows sample the whole cycle rather than its first -- deepest,
    dearest -- tensors."""
    n = sum(len(g["params"]) for g in opt.param_groups if g["second_order"])
    opt.start_round_robin(window * n // windows)


def run(modes: list[Mode], s: Settings, rounds: int = 1, on_result=None) -> list[dict]:
    """Measure every mode (each in a fresh child process), ``rounds`` times with the modes interleaved,
    so a burst of load on a shared machine hits one round of every mode rather than all of one mode.
    Each round's ratios are to that round's SGDM run the same way (eager or compiled in the same mode);
    a record holds the medians over rounds. The first mode of each kind must be SGDM, the baseline."""
    if not modes or modes[0].optimizer != "sgdm":
        raise ValueError("the first mode must be SGDM: the ratios are to it")
    for m in modes:  # compiled rows are compared with compiled SGDM, eager with eager
        first = next(x for x in modes if x.compiled == m.compiled)
        if first.optimizer != "sgdm":
            raise ValueError(f"the first mode compiled as {m.compiled!r} must be SGDM: its rows' ratios are to it")
    if s.window % _refresh_cycle(modes):
        raise ValueError(f"window={s.window} is not a multiple of every mode's hessian_every: use timing_window()")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "sgdph_tools"])
    per_round: list[list[dict]] = [[] for _ in modes]
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for _ in range(rounds):
            bases: dict[str | None, dict] = {}
            for i, mode in enumerate(modes):
                measured = pool.apply(_measure, (mode, s))
                base = bases.setdefault(mode.compiled, measured)
                per_round[i].append(
                    {
                        **measured,
                        "time_ratio": measured["step_ms"] / base["step_ms"],
                        "memory_ratio": measured["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None,
                    }
                )
                if on_result is not None:
                    on_result(mode, per_round[i][-1])
    records = []
    for mode, measured in zip(modes, per_round):
        record = dict(asdict(mode))
        for key in ("step_ms", "peak_mb", "time_ratio", "memory_ratio"):
            values = [m[key] for m in measured if m[key] is not None]
            record[key] = statistics.median(values) if values else None
        record["time_ratio_rounds"] = [m["time_ratio"] for m in measured]  # the spread: how far to trust the median
        records.append(record)
    return records


# ----------------------------------------------------------------------------- host time of the step alone


def _tiny_param_groups(model_name: str) -> list[dict]:
    """The model's param groups as ``sgdph_param_groups`` makes them, with every parameter replaced by
    a tiny tensor of the same number of dimensions (each at most 2 long) holding a gradient: a step on
    them times Python and dispatch, not arithmetic."""
    import timm

    import sgdph_tools  # noqa: F401  (registers the project's models)

    from .optim import sgdph_param_groups

    with torch.device("meta"):
        model = timm.create_model(model_name, num_classes=10)
    generator = torch.Generator().manual_seed(0)
    groups = []
    for group in sgdph_param_groups(model):
        params = []
        for p in group["params"]:
            tiny = torch.nn.Parameter(torch.randn(*[min(s, 2) for s in p.shape], generator=generator))
            tiny.grad = torch.randn(tiny.shape, generator=generator)
            params.append(tiny)
        groups.append(dict(group, params=params))
    return groups


def host_overhead(model_name: str, steps: int = 300, compile_mode: str | None = None) -> list[dict]:
    """Median host time of ``optimizer.step()`` alone, on one thread, for SGD(foreach) -- the
    baseline --, AdamW(foreach), and SGD-PH (defaults; and per tensor, ``foreach=False``) on a step
    that refreshes nothing, every tensor with curvature (the steady state between refreshes). With
    ``compile_mode``, also SGD's step through ``torch.compile`` and SGD-PH's ``compile_update``."""
    from .optim import SGDPH

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        groups = _tiny_param_groups(model_name)
        flat = [p for g in groups for p in g["params"]]
        second_order = sum(len(g["params"]) for g in groups if g["second_order"])

        def steady_sgdph(**kwargs) -> SGDPH:
            opt = SGDPH(groups, lr=1e-3, weight_decay=5e-4, hessian_every=10**9, **kwargs)
            for group in opt.param_groups:  # past the first (refreshing) step, every tensor with curvature
                for p in group["params"] if group["second_order"] else ():
                    opt.state[p]["step"].fill_(1.0)
                    opt.state[p]["hessian_refreshes"] = 1
                    opt.state[p]["hessian_ema"].uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(1))
            return opt

        contenders = {
            "sgd (foreach)": lambda: torch.optim.SGD(flat, lr=1e-3, momentum=0.9, weight_decay=5e-4, foreach=True),
            "adamw (foreach)": lambda: torch.optim.AdamW(flat, lr=1e-3, foreach=True),
            "sgdph, between refreshes": lambda: steady_sgdph(),
            "sgdph, between refreshes, per tensor": lambda: steady_sgdph(foreach=False),
        }
        if compile_mode:

            def compiled_step(opt):
                opt.step = torch.compile(opt.step, mode=compile_mode)
                return opt

            def compiled_update(opt):
                opt.compile_update(compile_mode)
                return opt

            sgd, named = contenders["sgd (foreach)"], f"compiled ({compile_mode})"
            contenders[f"sgd (foreach), {named}"] = lambda: compiled_step(sgd())
            contenders[f"sgdph, between refreshes, {named}"] = lambda: compiled_update(steady_sgdph())

        records = []
        for label, build in contenders.items():
            opt = build()
            for _ in range(20):  # compiled: the compilation happens here
                opt.step()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
            records.append({"optimizer": label, "step_us": 1e6 * statistics.median(times)})
        for r in records:
            r.update(ratio=r["step_us"] / records[0]["step_us"], tensors=len(flat), second_order=second_order)
        return records
    finally:
        torch.set_num_threads(threads)
