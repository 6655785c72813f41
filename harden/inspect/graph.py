"""The graph half of `harden inspect`: the gains of the functional operations of a torch.fx graph,
and where a graph joins two computed values (a residual or concat), which no product of layer
norms bounds."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from harden.inspect.layer_gains import _is_leaf, _leaf_modules, _parametrization_modules
from harden.layers.wca import WCAHead

_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.squeeze, torch.unsqueeze,
                    torch.transpose}
_SHAPE_METHODS = {"reshape", "view", "flatten", "permute", "transpose", "squeeze", "unsqueeze",
                  "contiguous"}
_ONE_LIPSCHITZ_FUNCTIONS = {torch.relu, F.relu, torch.tanh, torch.sigmoid, F.hardtanh, F.relu6}
_ONE_LIPSCHITZ_METHODS = {"relu", "tanh", "sigmoid"}


class _LayerTracer(fx.Tracer):
    """Traces through every forward written in Python and stops at the layers the hooks saw (and at
    WCA heads, whose forward is a chain), so that the graph's call_module nodes are those layers."""

    def __init__(self, layers: set[nn.Module]):
        super().__init__()
        self.layers = layers

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return module in self.layers or isinstance(module, WCAHead)


def _is_chain(module: nn.Module) -> bool:
    """Sequentials (and WCA heads) of layers all the way down: the layers run one after another."""
    skip = _parametrization_modules(module)
    return all(_is_leaf(m) or isinstance(m, (nn.Sequential, WCAHead)) for m in module.modules() if m not in skip)


def _graph_structure(module: nn.Module, assumptions: list[str]
                     ) -> tuple[fx.GraphModule | None, list[dict], str | None]:
    """The graph the bound is read from (None for a chain of layers), the gains of its functional
    ops, and why the product bound fails (or None).

    A model with a forward of its own (an architecture factory's class, say) is traced with torch.fx
    like an ONNX import: a residual x + f(x) is found there and refused, never multiplied through.
    """
    if isinstance(module, fx.GraphModule):
        skip = _parametrization_modules(module)
        containers = [(name, m) for name, m in module.named_modules()
                      if m is not module and m not in skip and not _is_leaf(m)
                      and not isinstance(m, (nn.Sequential, WCAHead))]
        if containers:
            names = ", ".join(f"'{name}' ({type(m).__name__})" for name, m in containers[:3])
            assumptions.append(f"the forward of {names} was not analysed: its layers are assumed to run one after another")
        return (module, *_fx_gains(module))
    if _is_chain(module):
        return None, [], None
    try:
        graph = fx.GraphModule(module, _LayerTracer(set(_leaf_modules(module))).trace(module))
    except Exception as error:  # noqa: BLE001 -- torch.fx raises many types on a forward it cannot trace
        first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        return None, [], (f"the forward of the model ({type(module).__name__}) could not be traced ({first}): "
                          "a product of layer norms is a bound only where the layers run one after another")
    return (graph, *_fx_gains(graph))


def _fx_gains(graph_module: fx.GraphModule) -> tuple[list[dict], str | None]:
    dependent: set[fx.Node] = set()
    rows: list[dict] = []
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
            continue
        if node.op in ("get_attr", "output"):
            continue
        if _is_shape_query(node):
            continue  # x.size(0), x.shape: a size, not a value of x, so not a second input where it is used
        inputs = [arg for arg in node.all_input_nodes if arg in dependent]
        if not inputs:
            continue
        dependent.add(node)
        if len(inputs) > 1:
            return rows, (f"the graph joins two computed values at '{node.name}' (a residual or concat): "
                          "a product of layer norms is not a bound there")
        if node.op == "call_module":
            continue  # its layers were traced with hooks
        gain = _function_gain(graph_module, node, inputs[0])
        if gain is None:
            return rows, f"the operation '{node.name}' ({_target_name(node)}) is not analysed"
        rows.append({"name": node.name, "type": _target_name(node), "l2_gain": gain[0],
                     "linf_gain": gain[0], "basis": gain[1]})
    return rows, None


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
        and node.args[1] in ("shape", "ndim", "dtype", "device")


def _in_graph_order(graph_module: fx.GraphModule, rows: list[dict], graph_rows: list[dict]) -> list[dict]:
    """Traced layer rows and functional-op rows merged in the order of the graph's nodes."""
    order: dict[str, int] = {}
    for index, node in enumerate(graph_module.graph.nodes):
        order[node.name] = index
        if node.op == "call_module":
            order.setdefault(f"module:{node.target}", index)

    functional = {id(row) for row in graph_rows}

    def position(row: dict) -> int:
        if id(row) in functional:
            return order[row["name"]]
        name = row["name"]
        while name:  # a layer inside a called module (e.g. a WCA head) sorts with that module
            if f"module:{name}" in order:
                return order[f"module:{name}"]
            name = name.rpartition(".")[0]
        return -1

    return sorted(rows + graph_rows, key=position)


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _constant(graph_module: fx.GraphModule, arg) -> torch.Tensor | None:
    if isinstance(arg, (int, float)):
        return torch.tensor(float(arg))
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = graph_module
        for part in arg.target.split("."):
            value = getattr(value, part)
        return value.detach() if isinstance(value, torch.Tensor) else None
    return None


def _function_gain(graph_module: fx.GraphModule, node: fx.Node, source: fx.Node) -> tuple[float, str] | None:
    target = node.target
    if target in _SHAPE_FUNCTIONS or (node.op == "call_method" and target in _SHAPE_METHODS):
        return 1.0, "reshape"
    if target is F.pad and node.kwargs.get("mode", "constant") == "constant":
        return 1.0, "constant padding"
    if target in _ONE_LIPSCHITZ_FUNCTIONS or (node.op == "call_method" and target in _ONE_LIPSCHITZ_METHODS):
        return 1.0, "1-Lipschitz activation"
    others = [a for a in node.args if a is not source]
    if len(others) != 1 or len(node.args) != 2:
        return None
    constant = _constant(graph_module, others[0])
    if constant is None:
        return None
    if target in (torch.add, operator.add, torch.sub, operator.sub):
        return 1.0, "shift by a constant"
    if target in (torch.mul, operator.mul):
        return float(constant.abs().max()), "scaling by a constant"
    if target in (torch.div, operator.truediv) and node.args[0] is source:
        return float((1.0 / constant.abs()).max()), "division by a constant"
    return None


