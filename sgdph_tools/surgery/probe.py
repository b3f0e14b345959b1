"""The numerical check behind every "normalised" decision: is a layer's channel scale redundant?

A layer is *normalised* when scaling each of its output channels by its own positive factor leaves
the train-mode function of the model unchanged -- BatchNorm after it, or a per-channel
GroupNorm/InstanceNorm, removes any such scale, so a ``gamma`` there would be redundant. LayerNorm over
the channels and RMSNorm remove only a common scale, GroupNorm one per group, LocalResponseNorm
neither: a layer feeding them still has a meaningful per-channel scale and is not normalised. The
probe measures exactly that definition, whatever the graph looks like (concatenations, ReLUs,
depthwise convs between the layer and the norm):

- a float64 copy of the model in train mode (BatchNorm uses batch statistics), with every stochastic
  layer (dropout, drop-path, stochastic depth) in eval mode, and every norm's ``eps`` made negligible
  (1e-30), so that the invariance, where it holds, holds to rounding;
- a batch of 8: the example batch topped up with random samples of its mean and spread (with 2
  samples a BatchNorm over pooled features outputs only ±1, whatever feeds it, and everything
  upstream would look invariant);
- one forward, then one per probed layer with a forward hook multiplying its output channels by
  factors drawn log-uniformly from [0.1, 10] (a wide range, so that a saturated gate -- an SE
  block's hard-sigmoid at initialisation -- still moves);
- what is compared is the input of the classifier(s) -- the features -- and, for the classifier itself,
  the model's output: a zero-initialised head (torchvision's ViT) makes the output constant, which
  would make every layer look redundant;
- the relative change, ``max |Δ| / max |value|``; the layer is normalised when it is below
  :data:`TOLERANCE`. A layer that is never called as a module (another op reads its weight) cannot
  be probed: the graph's decision stands, and the report says so.

Float64 and the tight tolerance matter: a layer behind a ConvNeXt layer scale initialised at 1e-6
changes the output by ~1e-6 only, which float32 noise would hide.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .. import module_kinds
from ..tagging import find_classifiers

#: Relative output change below which a channel scale counts as redundant (float64 rounding gives ~1e-14;
#: a real effect, even behind a ConvNeXt layer scale of 1e-6, measured 6e-9 and above).
TOLERANCE = 1e-11


def _stochastic(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.modules.dropout._DropoutNd) or "DropPath" in name or "StochasticDepth" in name


def channel_dim(layer: nn.Module) -> int:
    """The dimension of a conv/linear layer's output that holds its channels: last for a linear
    layer (and anything with ``in_features``), 1 for a convolution."""
    return -1 if isinstance(layer, nn.Linear) or hasattr(layer, "in_features") else 1


def tensors_in(out) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, or nested tuples/lists/dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in tensors_in(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in tensors_in(item)]
    return []


class ChannelScaleProbe:
    """Probes layers of one model on one example batch; build once, call :meth:`relative_change`
    per layer name. The model itself is not touched (the probe works on a float64 copy)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, seed: int = 0):
        self.model = copy.deepcopy(model).double().train()
        for module in self.model.modules():
            if _stochastic(module):
                module.eval()
            if module_kinds.is_norm(module) and isinstance(getattr(module, "eps", None), float):
                module.eps = 1e-30
        self.generator = torch.Generator().manual_seed(seed)
        x = example_input
        extra = max(0, 8 - x.shape[0])
        if x.is_floating_point():
            x = x.double()
            noise = torch.randn((extra, *x.shape[1:]), generator=self.generator, dtype=torch.float64)
            x = torch.cat([x, x.mean() + x.std() * noise])
        elif extra:  # token ids: more rows drawn from the same values
            rows = torch.randint(0, x.shape[0], (extra,), generator=self.generator)
            x = torch.cat([x, x[rows].roll(1, dims=-1)])
        self.x = x
        heads = find_classifiers(self.model)
        self.classifiers = {id(m) for m in heads}
        self.features: list[torch.Tensor] = []
        for head in heads:
            head.register_forward_pre_hook(lambda _m, args: self.features.append(args[0]) if args else None)
        self.baseline = self._run()

    @torch.no_grad()
    def _run(self) -> dict[str, list[torch.Tensor]]:
        self.features = []
        out = self.model(self.x)
        return {
            "output": [t.detach().clone() for t in tensors_in(out)],
            "features": [t.detach().clone() for t in self.features if isinstance(t, torch.Tensor)],
        }

    @torch.no_grad()
    def relative_change(self, name: str) -> float | None:
        """``max |Δ output| / max |output|`` when layer ``name``'s output channels are scaled; None
        when the layer is never called as a module (another op reads its weight, as
        ``nn.MultiheadAttention`` reads ``out_proj.weight``) or its output is all zeros (a
        zero-initialised head): then there is nothing the probe can scale."""
        change, scaled = self.joint_change([name])
        return change if scaled else None

    @torch.no_grad()
    def joint_change(self, names: list[str]) -> tuple[float, list[str]]:
        """The relative change when the output channels of every layer in ``names`` are scaled at once,
        each by its own random factors, and the layers that were scaled (called as a module, with a
        non-zero output). A change below :data:`TOLERANCE` shows every scaled layer redundant in one
        forward: independent random factors cannot cancel between layers (except on a set of measure
        zero), so the set is invariant only if each layer is. A larger change says that at least one
        is not, and which needs a test of its own."""
        factors: dict[str, dict] = {name: {} for name in names}

        def scaler(name: str, dim: int):
            mine = factors[name]

            def scale(_module, _inputs, tensor):
                if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                    return None  # not a conv/linear output: left as it is
                channels = tensor.shape[dim]
                mine["called"] = True
                mine["nonzero"] = mine.get("nonzero", False) or bool(tensor.abs().max() > 0)
                if "f" not in mine:  # the same factors for every call (a shared layer called twice)
                    exponent = 2 * torch.rand(channels, generator=self.generator, dtype=torch.float64) - 1
                    mine["f"] = 10.0**exponent
                shape = [1] * tensor.ndim
                shape[dim] = channels
                return tensor * mine["f"].view(shape).to(tensor.device)

            return scale

        handles, classifier = [], False
        for name in names:
            layer = self.model.get_submodule(name)
            handles.append(layer.register_forward_hook(scaler(name, channel_dim(layer))))
            classifier = classifier or id(layer) in self.classifiers
        try:
            changed = self._run()
        finally:
            for handle in handles:
                handle.remove()
        # never called as a module, or an all-zero output (a zero-initialised head): nothing was scaled
        scaled = [name for name in names if factors[name].get("called") and factors[name].get("nonzero")]
        # a classifier among them, or a model whose classifier is not found: the output; else the features
        where = "output" if classifier or not self.baseline["features"] else "features"
        before, after = self.baseline[where], changed[where]
        top = max((b.abs().max().item() for b in before if b.numel()), default=0.0) or 1.0
        diffs = [(a - b).abs().max().item() for a, b in zip(after, before) if a.numel()]
        return max(diffs, default=0.0) / top, scaled
