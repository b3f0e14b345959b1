"""``convert``: decouple every conv/linear that does not feed a norm into a weight-normalised layer.

The graph analysis (:mod:`.graph`) decides; the eager model is changed by swapping modules by
qualified name, so it keeps its class and methods (``forward_features``, ``reset_classifier``,
``pretrained_cfg``). Every conversion is verified: eval-mode outputs before and after must agree to
float rounding, otherwise :class:`VerificationError` is raised.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .. import checks, module_kinds
from ..errors import UserError, did_you_mean
from .graph import analyse
from .probe import TOLERANCE as PROBE_TOLERANCE
from .probe import ChannelScaleProbe, tensors_in
from .wn_layers import to_weight_norm, unconvertible_reason

# Actions in the report.
DECOUPLED = "decoupled"  # replaced by a weight-normalised layer
NORMALISED = "already normalised"  # feeds a norm layer: its channel scale is redundant
WEIGHT_STANDARDISED = "weight-standardised"  # StdConv2d & co normalise their own weight
EXCLUDED = "excluded"  # matched an --exclude pattern
KEPT = "kept"  # would be decoupled, but wn=False (report only)
NOT_CONVERTIBLE = "not convertible"  # see the reason

# Outputs may differ by float rounding only (about 1e-7 absolute; deep nets accumulate a little more).
RTOL, ATOL = 1e-4, 1e-5


class VerificationError(UserError):
    """The converted model computes something else than the original."""


@dataclass
class LayerReport:
    name: str
    layer_type: str
    action: str
    feeds_norm: bool
    evidence: str  # how the decision was made: graph, leaf graph, module order, checkpoint
    detail: str
    # the probe's measurement: relative change of the train-mode output when the layer's output
    # channels are scaled (surgery/probe.py); None where the layer was not probed or could not be
    probe_change: float | None = None


@dataclass
class ConversionReport:
    layers: list[LayerReport]
    wn: bool
    strip_norm: bool
    exclude: list[str]
    traced: bool
    trace_error: str | None = None
    notes: list[str] = field(default_factory=list)
    stripped_norms: list[str] = field(default_factory=list)
    max_abs_error: float | None = None
    input_shape: list[int] | None = None
    add_bias: bool = False  # decoupled layers without a bias got a zero one

    @property
    def decoupled(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.action == DECOUPLED]

    def counts(self) -> dict[str, int]:
        return dict(Counter(layer.action for layer in self.layers))

    def as_dict(self) -> dict:
        return {**asdict(self), "counts": self.counts()}


def strip_norms(model: nn.Module) -> list[str]:
    """Replace every normalisation layer by an identity (the paper's "without BN" variants).

    timm's fused norm+activation layers (BatchNormAct2d, ...) keep their dropout/activation children.
    Returns the names of the replaced layers.
    """
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or not module_kinds.is_norm(module):
            continue
        if any(name.startswith(r + ".") for r in replaced):
            continue
        children = [c for c in module.children() if not isinstance(c, nn.Identity)]
        model.set_submodule(name, nn.Sequential(*children) if children else nn.Identity())
        replaced.append(name)
    return replaced


def example_input_for(model: nn.Module, img_size: int | None = None, batch: int = 2) -> torch.Tensor:
    """A deterministic random batch shaped for ``model``: timm's ``pretrained_cfg['input_size']``, with
    the channels the model was built for (its first conv's ``in_channels``: a timm model built with
    ``in_chans=1`` keeps the 3 of its config)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    chans, height, width = cfg.get("input_size", (3, 224, 224))
    chans = _input_channels(model, cfg.get("first_conv")) or chans
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm ViTs built for another size
    if isinstance(fixed, (tuple, list)) and len(fixed) == 2:
        height, width = fixed
    if img_size is not None:
        height = width = img_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, chans, height, width, generator=gen).to(device)


def _input_channels(model: nn.Module, first_conv: str | None) -> int | None:
    """The channels the model's first convolution takes: the one timm's config names, else the first
    conv in module order; None when there is none (an MLP)."""
    modules = dict(model.named_modules())
    named = modules.get(first_conv) if isinstance(first_conv, str) else None
    for module in ([named] if named is not None else []) + list(modules.values()):
        # a convolution, or a decoupled one (WNConv keeps the conv's attributes)
        if isinstance(getattr(module, "in_channels", None), int) and getattr(module, "kernel_size", None):
            return module.in_channels
    return None


@torch.no_grad()
def eval_output(model: nn.Module, x: torch.Tensor):
    """The model's eval-mode output on ``x`` (no grad); the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def verify_outputs(before, after) -> float:
    """Max absolute difference between two model outputs; raises VerificationError beyond rounding."""
    a, b = tensors_in(before), tensors_in(after)
    if len(a) != len(b) or not a:
        raise VerificationError("verification failed: the converted model returns a different output structure")
    worst = max(((x.float() - y.float()).abs().max().item() for x, y in zip(a, b)), default=0.0)
    try:
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=RTOL, atol=ATOL)
    except AssertionError as exc:
        raise VerificationError(
            f"verification failed: the converted model's outputs differ from the original's by up to "
            f"{worst:.3g} (more than float rounding); exclude the offending layers with --exclude"
        ) from exc
    return worst


def convert(
    model: nn.Module,
    *,
    wn: bool = True,
    strip_norm: bool = False,
    exclude: Iterable[str] = (),
    layers: Iterable[str] | None = None,
    example_input: torch.Tensor | None = None,
    verify: bool = True,
    add_bias: bool | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """Decouple the conv/linear layers of ``model`` that feed no norm, in place.

    Args:
        model: a timm/torchvision/any ``nn.Module``; modified in place and returned.
        wn: decouple (``W = gamma · V/||V||``, with the layer's bias); False only reports what would
            happen.
        strip_norm: first replace every norm layer by an identity (a "without BN" variant).
        exclude: fnmatch patterns on module names to leave alone (e.g. ``"head.*"``).
        layers: decouple exactly these layers (used to re-apply a saved conversion), skipping the
            graph decisions.
        example_input: the batch used for verification (default: random, shaped from the model's
            ``pretrained_cfg``).
        verify: compare eval-mode outputs before and after; a mismatch raises VerificationError.
        add_bias: give decoupled layers that have no bias a zero one (more capacity; but once it
            trains away from zero the model no longer exports to its original architecture).
            Default: only with ``strip_norm`` -- the stripped norm's shift, in a model that has no
            plain equivalent anyway.

    Returns:
        ``(model, report)``; the report lists every conv/linear with its decision and reason.
    """
    checks.module("model", model)
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "model is a TorchScript module, which cannot be rewritten: convert the Python model "
            "(e.g. timm.create_model(...)) and script it afterwards"
        )
    add_bias = strip_norm if add_bias is None else bool(add_bias)
    exclude = checks.names("exclude", exclude)
    if layers is not None:
        layers = checks.names("layers", layers)
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor (a batch the model takes), got {type(example_input).__name__}")
    stripped = strip_norms(model) if strip_norm else []
    if verify and example_input is None:
        example_input = example_input_for(model)
    before = eval_output(model, example_input) if verify else None

    analysis = analyse(model)
    forced = set(layers) if layers is not None else None
    paths, owners = module_paths(model), parameter_owners(model)
    # Every decision is checked on the computation itself (surgery/probe.py): is the layer's
    # per-channel scale redundant in train mode? The probe overrides the graph where they disagree.
    probe = ChannelScaleProbe(model, example_input) if verify and forced is None and example_input is not None else None
    # Without a norm that removes per-channel scales, no layer can be normalised: there only the
    # graph's "normalised" decisions need the probe (it costs a float64 forward per layer).
    any_channel_norm = any(module_kinds.removes_channel_scale(m) for m in model.modules())
    # The layers the graph calls normalised are probed together first: one forward confirms them all
    # when the set is invariant (a BN network's convs; ResNet-50 needs 1 forward instead of 53),
    # otherwise each is probed on its own.
    together: dict[str, float] = {}
    if probe is not None:
        proposed = [
            n
            for n, d in analysis.decisions.items()
            if d.feeds_norm and module_kinds.is_conv_or_linear(model.get_submodule(n))
        ]
        if len(proposed) > 1:
            change, scaled = probe.joint_change(proposed)
            if change < PROBE_TOLERANCE:
                together = dict.fromkeys(scaled, change)
    reports: list[LayerReport] = []
    for name, decision in analysis.decisions.items():
        module = model.get_submodule(name)
        evidence, detail = decision.evidence, decision.detail
        feeds_norm = decision.feeds_norm
        probed = probe is not None and module_kinds.is_conv_or_linear(module) and (any_channel_norm or feeds_norm)
        if name in together:
            change = together[name]
        else:
            change = probe.relative_change(name) if probed else None
        if probed and change is None:
            detail = (
                f"{detail}; probe: nothing to scale (not called as a module, or an all-zero output), "
                f"the {evidence} decision stands"
            )
        if change is not None:
            redundant = change < PROBE_TOLERANCE
            if redundant != feeds_norm:
                graph_said = "feeds a norm" if feeds_norm else "feeds no norm"
                detail = f"{detail}; but the {evidence} decision ({graph_said}) is overruled by the probe"
            feeds_norm = redundant
            evidence = f"{evidence} + probe"
            jointly = (
                f" with those of the {len(together) - 1} other layers the graph calls normalised"
                if name in together
                else ""
            )
            verdict = "redundant" if redundant else "a real scale"
            detail = (
                f"{detail}; probe: scaling its output channels{jointly} changes the train-mode output by "
                f"{change:.1e} (relative; {verdict} at tolerance {PROBE_TOLERANCE:g})"
            )
        also = [p for p in paths[id(module)] if p != name]
        if also:  # one module under several names: converted once, every name keeps pointing at it
            detail = f"{detail}; the same module is also registered as {', '.join(also)}"
        tied = [
            f"{local} is {path}"
            for local, param in module.named_parameters(recurse=False)
            for owner, path in owners.get(id(param), [])
            if owner != id(module)
        ]
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            action, detail = EXCLUDED, f"matches --exclude; {detail}"
        elif forced is not None:
            action = DECOUPLED if name in forced else NORMALISED if feeds_norm else KEPT
            evidence = "checkpoint"
        elif module_kinds.is_weight_norm(module):
            action, detail = NOT_CONVERTIBLE, "already weight-normalised"
        elif module_kinds.is_weight_standardised(module):
            action, detail = WEIGHT_STANDARDISED, f"{type(module).__name__} standardises its own weight"
        elif feeds_norm:
            action = NORMALISED
        elif not wn:
            action = KEPT
        elif tied:  # e.g. an LM head tied to its embedding: its own direction and gamma would untie them
            action, detail = NOT_CONVERTIBLE, f"tied parameters ({'; '.join(tied)}): decoupling would untie them"
        else:
            reason = unconvertible_reason(module)
            action, detail = (NOT_CONVERTIBLE, reason) if reason else (DECOUPLED, detail)
        reports.append(LayerReport(name, decision.layer_type, action, feeds_norm, evidence, detail, change))

    for pattern in exclude:  # a pattern that matches nothing is a typo, not a choice
        if not any(fnmatch.fnmatchcase(r.name, pattern) for r in reports):
            names = [r.name for r in reports]
            raise UserError(
                f"--exclude {pattern!r} matches no conv/linear layer{did_you_mean(pattern, names)} "
                f"(the layers: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}; `sgdph inspect` lists all)"
            )
    if forced is not None:
        missing = forced - {r.name for r in reports}
        if missing:
            raise UserError(f"the saved conversion names layers this model does not have: {sorted(missing)[:5]}")
    for report in reports:
        if report.action == DECOUPLED:
            _replace_everywhere(model, paths, model.get_submodule(report.name), lambda m: to_weight_norm(m, add_bias))

    result = ConversionReport(
        layers=reports,
        wn=wn,
        strip_norm=strip_norm,
        exclude=exclude,
        traced=analysis.traced,
        trace_error=analysis.trace_error,
        notes=analysis.notes,
        stripped_norms=stripped,
        add_bias=add_bias,
    )
    if verify:
        result.max_abs_error = verify_outputs(before, eval_output(model, example_input))
        result.input_shape = list(example_input.shape)
    return model, result


def bake_model(model: nn.Module) -> nn.Module:
    """Fold every weight-normalised layer back into a plain conv/linear, in place (a shared one once,
    under all of its names)."""
    paths = module_paths(model)
    for name, module in list(model.named_modules()):
        if name and module_kinds.is_weight_norm(module):
            _replace_everywhere(model, paths, module, lambda m: m.bake())
    return model


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module is registered under, by ``id``: a module assigned to two attributes
    (``self.b = self.a``) has two, which ``named_modules()`` would list once."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[int, str]]]:
    """For each parameter (by ``id``), the modules that hold it directly and its name there: a tied
    parameter (``head.weight = embed.weight``) has owners in two modules."""
    owners: dict[int, list[tuple[int, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for local, param in module.named_parameters(recurse=False):
            entry = (id(module), f"{name}.{local}" if name else local)
            if entry not in owners.setdefault(id(param), []):
                owners[id(param)].append(entry)
    return owners


def _replace_everywhere(model: nn.Module, paths: dict[int, list[str]], module: nn.Module, make) -> None:
    """Put ``make(module)`` at every name ``module`` is registered under: shared stays shared."""
    new = make(module)
    for path in paths[id(module)]:
        model.set_submodule(path, new)
