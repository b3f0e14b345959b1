"""Graph analysis: for every conv/linear module of a model, does its output feed a normalisation?

The model is traced with ``torch.fx`` using timm's leaf-module and autowrap lists (so timm models
that plain ``symbolic_trace`` cannot handle still trace), with norms and conv/linear layers as leaves;
a submodule whose forward does not trace (control flow on values) is made a leaf and the trace retried.
From a conv/linear node the analysis follows the output through shape-only ops (permute, reshape,
flatten, transpose, view, contiguous, ...) and identity-like modules, ignores users that only read
its shape (``size()``, ``reshape_as(x)``'s argument, ...), and decides that the layer feeds a norm when
every real consumer is a norm that removes each channel's own scale (BatchNorm, InstanceNorm, GroupNorm
with a channel per group, FilterResponseNorm; ``F.batch_norm``, ``F.instance_norm``): LayerNorm over
channels, RMSNorm and GroupNorm by groups remove only a common scale, so a layer feeding them keeps a
real per-channel scale (``module_kinds.removes_channel_scale``; the probe checks it numerically).

Layers the top-level graph does not show as module calls are still decided, and the report says how
(``evidence``):
- ``leaf graph``: inside a leaf module (timm's notrace list, torch.nn containers such as
  MultiheadAttention) the leaf is traced on its own, its output inheriting the leaf node's consumers;
- ``weight use``: a layer never called but whose weight an op reads (``F.linear(x, self.proj.weight)``,
  a wrapped attention function) is decided from what that op feeds;
- ``leaf output``: the last layer of a leaf that does not trace inherits the leaf's consumers;
- ``module order``: anything else (or everything, when the model does not trace): does a norm layer
  come next in registration order (one that removes each channel's scale)?

The graph is only used to decide; the eager model is never replaced by a GraphModule.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import module_kinds

GRAPH, LEAF_GRAPH, WEIGHT_USE, LEAF_OUTPUT, MODULE_ORDER = (
    "graph",
    "leaf graph",
    "weight use",
    "leaf output",
    "module order",
)

# Ops that only move or reshape data: the tensor's channels survive, so look through them.
_PASS_THROUGH_METHODS = {
    "view",
    "reshape",
    "permute",
    "transpose",
    "flatten",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
    "unflatten",
    "movedim",
    "swapaxes",
    "swapdims",
    "to",
    "float",
}
_PASS_THROUGH_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.movedim,
    torch.swapaxes,
    torch.unflatten,
}
_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.Unflatten)
# Uses that read only a tensor's shape/dtype/device.
_SHAPE_METHODS = {"size", "dim", "numel", "type_as"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim"}
_AS_METHODS = {"view_as", "reshape_as", "expand_as", "type_as"}  # their argument is a shape donor


def _norm_functions() -> set:
    fns = {
        F.batch_norm,
        F.layer_norm,
        F.group_norm,
        F.instance_norm,
        torch.batch_norm,
        torch.layer_norm,
        torch.group_norm,
        torch.instance_norm,
    }
    if hasattr(F, "rms_norm"):
        fns |= {F.rms_norm}
    try:  # timm's fused/fast norm functions, which its norm layers call
        from timm.layers import fast_norm

        fns |= {
            getattr(fast_norm, n)
            for n in dir(fast_norm)
            if "norm" in n and callable(getattr(fast_norm, n)) and not n.startswith(("is_", "set_", "get_", "_"))
        }
    except ImportError:
        pass
    return fns


NORM_FUNCTIONS = _norm_functions()
# The functional norms among them that remove each channel's own scale (module_kinds.removes_channel_scale).
CHANNEL_NORM_FUNCTIONS = {F.batch_norm, torch.batch_norm, F.instance_norm, torch.instance_norm}


@dataclass
class LayerDecision:
    name: str  # qualified module name
    layer_type: str
    feeds_norm: bool
    evidence: str  # GRAPH, LEAF_GRAPH or MODULE_ORDER
    detail: str  # what it feeds, or why the fallback was used


@dataclass
class GraphAnalysis:
    decisions: dict[str, LayerDecision]  # every conv/linear module, in module order
    traced: bool
    trace_error: str | None = None
    notes: list[str] = field(default_factory=list)
    # leaves that did not trace: name -> (feeds_norm, detail) of the leaf's own output
    untraced_leaves: dict[str, tuple[bool, str]] = field(default_factory=dict)


class _Tracer(fx.Tracer):
    """timm's leaf modules and autowrap functions, plus norms and conv/linear layers as leaves, plus
    ``extra_leaves``: submodules (by qualified name) that failed to trace in an earlier attempt."""

    def __init__(self, extra_leaves: frozenset[str] = frozenset()):
        try:
            from timm.layers._fx import get_notrace_functions, get_notrace_modules

            leaf_types, functions = tuple(get_notrace_modules()), get_notrace_functions()
        except ImportError:
            leaf_types, functions = (), []
        super().__init__(autowrap_functions=tuple(f for f in functions if callable(f)))
        self.leaf_types, self.extra_leaves = leaf_types, extra_leaves
        self.stack: list[str] = []  # the non-leaf modules being traced, innermost last
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if (
            module_kinds.is_norm(m)
            or module_kinds.is_conv_or_linear(m)
            or module_kinds.is_weight_norm(m)
            or isinstance(m, self.leaf_types)
            or qualname in self.extra_leaves
        ):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        self.stack.append(qualname)
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = qualname  # the innermost module whose forward did not trace
            raise
        self.stack.pop()
        return result


def trace(module: nn.Module, max_retries: int = 32) -> tuple[fx.Graph, list[str]]:
    """Trace ``module.forward`` with its optional arguments fixed at their defaults (so that a
    ``mask=None`` argument takes the ``None`` branch instead of becoming a placeholder).

    A submodule whose forward does not trace is made a leaf and the trace retried, so one
    untraceable block does not lose the whole graph. Returns the graph and those submodules' names.
    """
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    concrete = {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    leaves: list[str] = []
    for _ in range(max_retries):
        tracer = _Tracer(frozenset(leaves))
        try:
            return tracer.trace(module, concrete_args=concrete or None), leaves
        except Exception:
            if not tracer.failed_in:  # the root's own forward failed: nothing to isolate
                raise
            leaves.append(tracer.failed_in)
    raise RuntimeError(f"gave up after isolating {max_retries} untraceable submodules")


def _is_shape_only_use(user: fx.Node, node: fx.Node) -> bool:
    if user.op == "call_method":
        if user.target in _SHAPE_METHODS and user.args and user.args[0] is node:
            return True
        if user.target in _AS_METHODS and node in user.args[1:]:
            return True
    if user.op == "call_function":
        if user.target is getattr and len(user.args) > 1 and user.args[1] in _SHAPE_ATTRS:
            return True
        name = getattr(user.target, "__name__", "")
        if name.endswith("_like"):  # torch.zeros_like(x) and friends
            return True
    return False


def _is_pass_through(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if user.op == "call_method":
        return user.target in _PASS_THROUGH_METHODS and bool(user.args) and user.args[0] is node
    if user.op == "call_function":
        return user.target in _PASS_THROUGH_FUNCTIONS and bool(user.args) and user.args[0] is node
    if user.op == "call_module":
        return isinstance(modules.get(user.target), _PASS_THROUGH_MODULES)
    return False


def _consumers(node: fx.Node, modules: dict[str, nn.Module]) -> Iterator[tuple[fx.Node, list[str]]]:
    """The real consumers of ``node``'s output, each with the pass-through ops on the way."""
    stack = [(node, [])]
    seen = set()
    while stack:
        current, path = stack.pop()
        for user in current.users:
            if user in seen or _is_shape_only_use(user, current):
                continue
            seen.add(user)
            if _is_pass_through(user, current, modules):
                stack.append((user, path + [_short(user)]))
            else:
                yield user, path


def _short(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _describe_norm(consumer: fx.Node, modules: dict[str, nn.Module], prefix: str) -> tuple[str, bool] | None:
    """``(description, removes each channel's scale)`` if ``consumer`` is a normalisation, else None."""
    if consumer.op == "call_module":
        m = modules.get(consumer.target)
        if m is not None and module_kinds.is_norm(m):
            return f"{type(m).__name__} '{prefix}{consumer.target}'", module_kinds.removes_channel_scale(m)
    elif consumer.op == "call_function" and consumer.target in NORM_FUNCTIONS:
        name = f"{getattr(consumer.target, '__module__', '')}.{consumer.target.__name__}".lstrip(".")
        return name, consumer.target in CHANNEL_NORM_FUNCTIONS
    return None


# What the output of a graph traced on its own feeds, when the module's caller did not trace.
UNKNOWN = ("unknown",)


def _decide_node(node, modules, prefix, output_context) -> tuple[bool, str] | None:
    """(feeds_norm, detail) for the output of ``node``, or None when it cannot be decided here.
    ``output_context`` says what the graph's output feeds: None for the model itself, the leaf
    node's (feeds_norm, detail) for a leaf traced on its own, or UNKNOWN."""
    found = list(_consumers(node, modules))
    if not found:
        return False, "its output is not used"
    norms, others = [], []
    for consumer, path in found:
        via = f" through {', '.join(path)}" if path else ""
        if consumer.op == "output":
            if output_context is UNKNOWN:
                return None
            if output_context is None:
                others.append(f"the model output{via}")
            elif output_context[0]:
                norms.append(f"{output_context[1]} (after its leaf module){via}")
            else:
                others.append(f"{output_context[1]} (after its leaf module){via}")
            continue
        norm = _describe_norm(consumer, modules, prefix)
        if norm is None:
            others.append(_short(consumer) + via)
        elif norm[1]:
            norms.append(norm[0] + via)
        else:  # LayerNorm, RMSNorm, GroupNorm by groups: only a common scale goes, the layer's own stays
            others.append(f"{norm[0]} (does not remove each channel's scale){via}")
    if others:
        return False, "feeds " + ", ".join(others[:3]) + (" and a norm" if norms else "")
    return True, "feeds " + ", ".join(norms[:3])


def _analyse_graph(graph, root, prefix, output_context, decisions, evidence, analysis, depth=0) -> None:
    modules = dict(root.named_modules())
    weight_reads: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":  # a parent reading a layer's weight instead of calling the layer
            owner, _, attr = str(node.target).rpartition(".")
            if attr in ("weight", "bias") and owner in modules and module_kinds.is_conv_or_linear(modules[owner]):
                weight_reads.setdefault(owner, []).append(node)
        if node.op != "call_module":
            continue
        module = modules[node.target]
        name = prefix + node.target
        if module_kinds.is_conv_or_linear(module) or module_kinds.is_weight_norm(module):
            _record(decisions, name, module, _decide_node(node, modules, prefix, output_context), evidence)
        elif not module_kinds.is_norm(module) and _has_conv_or_linear(module):
            # A leaf that hides conv/linear layers: trace it on its own; its output feeds what the
            # leaf node feeds in this graph.
            context = _decide_node(node, modules, prefix, output_context) or UNKNOWN
            _analyse_module(module, name, context, decisions, analysis, depth + 1)
    # Layers whose weight is read by an op (F.linear(x, self.proj.weight), a wrapped attention
    # function...) but that are never called: decide from what that op feeds.
    for owner, reads in weight_reads.items():
        name = prefix + owner
        if name in decisions:
            continue
        for read in reads:
            for user in read.users:
                decided = _decide_node(user, modules, prefix, output_context)
                if decided is not None:
                    decided = (decided[0], f"its weight is read by {_short(user)}, which {decided[1]}")
                _record(decisions, name, modules[owner], decided, WEIGHT_USE)


def _analyse_module(module, name, context, decisions, analysis, depth) -> None:
    """Trace a leaf module on its own. When it does not trace, trace its children instead (what
    their outputs feed inside the untraceable module is unknown: those layers stay undecided)."""
    if depth > 6:
        return
    try:
        sub, isolated = trace(module)
    except Exception as exc:  # noqa: BLE001 -- any tracing failure means: fall back
        if context is not UNKNOWN:
            analysis.notes.append(f"leaf '{name}' ({type(module).__name__}) did not trace: {_first_line(exc)}")
            analysis.untraced_leaves[name] = context
        for child_name, child in module.named_children():
            if not (module_kinds.is_conv_or_linear(child) or module_kinds.is_norm(child)) and _has_conv_or_linear(
                child
            ):
                _analyse_module(child, f"{name}.{child_name}", UNKNOWN, decisions, analysis, depth + 1)
        return
    _note_isolated(analysis, name, isolated)
    _analyse_graph(sub, module, f"{name}.", context, decisions, LEAF_GRAPH, analysis, depth)


def _note_isolated(analysis, prefix: str, isolated: list[str]) -> None:
    for qualname in isolated:
        full = f"{prefix}.{qualname}" if prefix else qualname
        analysis.notes.append(f"'{full}' did not trace as part of its parent; analysed as a leaf")


def _record(decisions, name, module, decided, evidence) -> None:
    if decided is None:  # undecidable here: left to the fallbacks
        return
    feeds, detail = decided
    previous = decisions.get(name)
    if previous is None:
        decisions[name] = LayerDecision(name, type(module).__name__, feeds, evidence, detail)
    elif previous.feeds_norm and not feeds:  # a layer used twice: every use must feed a norm
        previous.feeds_norm, previous.detail = False, f"{previous.detail}; also {detail}"


def _has_conv_or_linear(module: nn.Module) -> bool:
    return any(module_kinds.is_conv_or_linear(m) for m in module.modules())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _module_order_decision(name: str, order: list[tuple[str, nn.Module]], why: str) -> tuple[bool, str]:
    index = next(i for i, (n, _) in enumerate(order) if n == name)
    for next_name, next_module in order[index + 1 :]:
        if next_name.startswith(name + "."):
            continue
        if module_kinds.removes_channel_scale(next_module):
            return True, f"{why}; the next layer in module order is {type(next_module).__name__} '{next_name}'"
        return False, f"{why}; the next layer in module order is {type(next_module).__name__} '{next_name}'"
    return False, f"{why}; it is the last layer in module order"


def analyse(model: nn.Module) -> GraphAnalysis:
    """Decide, for every conv/linear module of ``model``, whether it feeds a normalisation layer."""
    decisions: dict[str, LayerDecision] = {}
    analysis = GraphAnalysis(decisions={}, traced=True)
    try:
        graph, isolated = trace(model)
    except Exception as exc:  # noqa: BLE001
        analysis.traced, analysis.trace_error = False, _first_line(exc)
    else:
        _note_isolated(analysis, "", isolated)
        _analyse_graph(graph, model, "", None, decisions, GRAPH, analysis)

    # Module order over conv/linear and norm layers: the fallback for every layer left undecided.
    order = [
        (n, m)
        for n, m in model.named_modules()
        if module_kinds.is_conv_or_linear(m) or module_kinds.is_weight_norm(m) or module_kinds.is_norm(m)
    ]
    for name, module in order:
        if module_kinds.is_norm(module) or name in decisions:
            continue
        leaf = next((lf for lf in analysis.untraced_leaves if name.startswith(lf + ".")), None)
        if leaf is not None and name == _last_layer_in(model.get_submodule(leaf), leaf):
            feeds, leaf_detail = analysis.untraced_leaves[leaf]
            detail = f"the last layer of leaf '{leaf}', which did not trace; the leaf {leaf_detail}"
            decisions[name] = LayerDecision(name, type(module).__name__, feeds, LEAF_OUTPUT, detail)
            continue
        if not analysis.traced:
            why = "the model did not trace"
        elif leaf is not None:
            why = f"inside leaf '{leaf}', which did not trace"
        else:
            why = "never called as a module and its weight never read in the graph"
        feeds, detail = _module_order_decision(name, order, why)
        decisions[name] = LayerDecision(name, type(module).__name__, feeds, MODULE_ORDER, detail)
    analysis.decisions = {n: decisions[n] for n, m in order if n in decisions}
    return analysis


def _last_layer_in(leaf: nn.Module, prefix: str) -> str | None:
    names = [n for n, m in leaf.named_modules() if module_kinds.is_conv_or_linear(m)]
    return f"{prefix}.{names[-1]}" if names else None
