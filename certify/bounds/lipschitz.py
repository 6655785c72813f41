"""Lipschitz-margin certificates: the cheapest sound bound, for l2 balls and l-infinity boxes.

For a chain of layers f = h o g_m o ... o g_1 with h(z) = W z + b the last dense layer (onto the
outputs), a specification row c (e.g. e_y - e_j) has

    c^T f(x') >= c^T f(x) - ||W^T c|| * prod_i L_i(g_i) * ||x' - x||

with L_i each layer's Lipschitz constant: an upper bound on the operator norm of a Conv2d /
Linear (certify.bounds.operator_norms: exact SVD or Gram iteration, never power iteration), the
largest |scale| of an eval BatchNorm or of a multiplication by a constant, the pooling overlap,
1/4 for a sigmoid, the largest slope of a (Leaky)ReLU / ELU, and 1 for tanh, reshapes, constant
shifts and constant padding. So a sample is verified on the ball of radius eps when each margin at
its centre exceeds its constant times eps.

For l-infinity the chain is read in both norms: the exact l-infinity operator norms (largest
absolute row sums) with ||W^T c||_1, and every split where the first k layers are taken in
l-infinity, the rest in l2, through ||z||_2 <= sqrt(dim z) ||z||_inf at the split; the smallest
of them is used. A box is bounded as the l-infinity ball around its centre of its largest half
width, which contains it.

The product rule holds only where the layers run one after another: a graph that joins two
computed values (a residual add, a concatenation, a product of two activations), or that holds
an operation not listed above, gets no constant (`LipschitzChain.refused` says why) and the stage
decides nothing on it. The graph is the module certify bounds (an ONNX import, traced by torch.fx).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from certify.bounds.lipschitz_ops import (Step, folded_step, function_gain,
                                          module_step)
from certify.bounds.operator_norms import ROUNDING


@dataclass
class LipschitzChain:
    """The layers of a chain and its last dense layer, or why the model is not such a chain."""

    steps: list[Step] = field(default_factory=list)
    head: torch.Tensor | None = None  # (outputs, features) float64; None: the outputs themselves
    head_name: str | None = None
    input_numel: int = 0
    refused: str | None = None

    def to_json(self) -> dict:
        """The steps, and "l2_product": the product of their l2 constants (the layers before the last
        dense one, which each margin's own row difference of that layer multiplies)."""
        return {"refused": self.refused, "last_dense_layer": self.head_name,
                "layers": [step.to_json() for step in self.steps],
                "l2_product": math.prod(step.l2 for step in self.steps) if self.refused is None else None}

    def _rows(self, c: torch.Tensor) -> torch.Tensor:
        c = c.to(torch.float64)
        return c if self.head is None else c @ self.head.to(c.device)

    def l2_constants(self, c: torch.Tensor) -> torch.Tensor:
        """Upper bounds (n, rows) on the l2 Lipschitz constant of x -> c_row^T f(x), c (n, rows, outputs)."""
        return self._rows(c).norm(dim=-1) * math.prod(step.l2 for step in self.steps)

    def linf_constants(self, c: torch.Tensor) -> torch.Tensor:
        """Upper bounds (n, rows) on the constant of x -> c_row^T f(x) from l-infinity inputs."""
        rows = self._rows(c)
        pure = rows.abs().sum(-1) * math.prod(step.linf for step in self.steps)
        dims = [self.input_numel] + [step.output_numel for step in self.steps]
        split = min(math.prod(s.linf for s in self.steps[:k]) * math.sqrt(dims[k])
                    * math.prod(s.l2 for s in self.steps[k:]) for k in range(len(dims)))
        return torch.minimum(pure, rows.norm(dim=-1) * split)


def _float32_down(values: torch.Tensor) -> torch.Tensor:
    """float64 values in float32, each rounded down (a lower bound stays a lower bound)."""
    rounded = values.float()
    return torch.where(rounded.double() > values, torch.nextafter(rounded, torch.tensor(-float("inf"))), rounded)


def lipschitz_lower_bounds(chain: LipschitzChain, module: nn.Module, x_lower: torch.Tensor,
                           x_upper: torch.Tensor, c: torch.Tensor, *,
                           l2_ball: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Sound lower bounds (n, rows) of C f(x) over the boxes (or, with `l2_ball` = (centres, radii),
    over the whole l2 balls); -inf everywhere for a refused chain."""
    if chain.refused is not None:
        return torch.full(c.shape[:2], -float("inf"), device=c.device)
    if l2_ball is not None:
        centre, radii = l2_ball[0], l2_ball[1].to(c.device, torch.float64)
        constants = chain.l2_constants(c)
    else:
        centre = (x_lower + x_upper) / 2
        radii = ((x_upper.double() - x_lower.double()) / 2).flatten(1).amax(1).to(c.device)
        constants = chain.linf_constants(c)
    with torch.no_grad():
        outputs = module(centre.to(c.device, torch.float32)).double()
    margins = torch.einsum("nkc,nc->nk", c.to(torch.float64), outputs)
    return _float32_down(margins - constants * (1.0 + ROUNDING) * radii[:, None])


# -- reading the chain from the graph ------------------------------------------------------------

def analyse(module: nn.Module, input_shape: tuple[int, ...]) -> LipschitzChain:
    """The Lipschitz chain of `module` on per-sample inputs of `input_shape`, or a refusal."""
    try:
        graph = module if isinstance(module, fx.GraphModule) else fx.symbolic_trace(module)
        reference = next(iter(module.parameters()), torch.zeros(()))
        ShapeProp(graph).propagate(torch.zeros(1, *input_shape, dtype=reference.dtype, device=reference.device))
    except Exception as error:  # noqa: BLE001 -- torch.fx raises many types on a forward it cannot trace
        return LipschitzChain(refused=f"the forward could not be traced ({_first_line(error)})")
    chain = LipschitzChain(input_numel=math.prod(input_shape))
    computed: set[fx.Node] = set()  # the values that depend on the input: the chain so far
    last = None
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            computed.add(node)
            last = node
            continue
        if node.op == "get_attr" or _is_shape_query(node):
            continue  # a constant, or a size of the chain's value: a number, not a second input
        if node.op == "output":
            if node.args[0] is not last:
                chain.refused = "the output is not the end of one chain of operations"
            break
        inputs = [arg for arg in _flat_args(node) if isinstance(arg, fx.Node) and arg in computed]
        if not inputs:
            continue
        if len(inputs) > 1 or inputs[0] is not last:
            chain.refused = (f"{_label(graph, node)} joins two computed values or branches (a residual add, a "
                             "concatenation, a product): the product rule does not hold there")
            break
        try:
            step = _step(graph, node, last)
        except (KeyError, RuntimeError, ValueError, TypeError) as error:  # a form of an op not foreseen here
            step = f"could not be analysed ({_first_line(error)})"
        if isinstance(step, str):
            chain.refused = f"{_label(graph, node)}: {step}"
            break
        folded = folded_step(chain.steps[-1], graph.get_submodule(node.target), step.name) \
            if chain.steps and node.op == "call_module" and step.kind.startswith("BatchNorm") else None
        if folded is not None:
            chain.steps[-1] = folded
        else:
            chain.steps.append(step)
        computed.add(node)
        last = node
    if chain.refused is None:
        _split_head(chain)
    return chain


def _split_head(chain: LipschitzChain) -> None:
    """Take the last dense layer out of the chain where only order-keeping steps follow it."""
    index = len(chain.steps) - 1
    while index >= 0 and chain.steps[index].keeps_order:
        index -= 1
    if index >= 0 and chain.steps[index].weight is not None:
        chain.head = chain.steps[index].weight
        chain.head_name = chain.steps[index].name
        del chain.steps[index:]


def _flat_args(node: fx.Node) -> list:
    flat: list = []
    fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return flat


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return node.op == "call_function" and node.target is getattr


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _label(graph: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(graph.get_submodule(node.target)).__name__})"
    return f"'{node.name}' ({_target_name(node)})"


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape[1:])


def _step(graph: fx.GraphModule, node: fx.Node, source: fx.Node) -> Step | str:
    """The step computed by `node` from the chain's value `source`, or why it has no constant."""
    if node.op == "call_module":
        return module_step(graph.get_submodule(node.target), node.target, _shape(source), _shape(node))
    gain = function_gain(graph, node, source)
    if isinstance(gain, str):
        return gain
    l2, linf, method, keeps_order = gain
    return Step(node.name, _target_name(node), l2, linf, method, math.prod(_shape(node)), keeps_order)
