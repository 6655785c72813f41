"""The Lipschitz constant of each operation a Lipschitz chain may hold (certify.bounds.lipschitz):
layers (call_module nodes of the traced graph) and functional operations with constants."""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from certify.bounds.operator_norms import conv_norms, linear_norms

# Reshapes that keep the order of one sample's values (so they may follow the last dense layer).
_ORDER_KEEPING_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_ORDER_KEEPING_METHODS = {"reshape", "view", "flatten", "squeeze", "unsqueeze", "contiguous"}
_REORDERING_FUNCTIONS = {torch.permute, torch.transpose}
_REORDERING_METHODS = {"permute", "transpose"}
_ONE_LIPSCHITZ_FUNCTIONS = {torch.relu, F.relu, torch.tanh, F.hardtanh, F.relu6}
_ONE_LIPSCHITZ_METHODS = {"relu", "tanh"}
_SIGMOID_FUNCTIONS = {torch.sigmoid, F.sigmoid}
_ADD = {torch.add, operator.add}
_SUB = {torch.sub, operator.sub}
_MUL = {torch.mul, operator.mul}
_DIV = {torch.div, operator.truediv}
# Element-wise with slopes in [0, 1].
_ONE_LIPSCHITZ_MODULES = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softplus)
_ORDER_KEEPING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d)
NOT_COVERED = "not an operation the product rule covers here"


@dataclass
class Step:
    """One operation of the chain and its Lipschitz constants in l2 and l-infinity."""

    name: str
    kind: str
    l2: float
    linf: float
    method: str
    output_numel: int
    keeps_order: bool = False  # a reshape or a shift by a constant: transparent after the last dense layer
    weight: torch.Tensor | None = None  # a Linear's weight (float64): the candidate last dense layer
    layer: nn.Module | None = None  # a Conv2d / Linear, kept so that a BatchNorm after it can be folded in
    input_shape: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.kind, "l2": self.l2, "linf": self.linf, "method": self.method}


def module_step(layer: nn.Module, name: str, input_shape: tuple[int, ...],
                output_shape: tuple[int, ...]) -> Step | str:
    """The step of one layer on per-sample inputs of `input_shape`, or why it has no constant."""
    kind, numel = type(layer).__name__, math.prod(output_shape)
    if isinstance(layer, nn.Conv2d):
        try:
            l2, linf = conv_norms(layer, input_shape)
        except ValueError as error:
            return str(error)
        # a parametrized one is a Conv2d too
        return Step(name, "Conv2d", l2.value, linf, l2.method, numel, layer=layer, input_shape=input_shape)
    if isinstance(layer, nn.Linear):
        l2, linf = linear_norms(layer.weight)
        head = layer.weight.detach().to(torch.float64) if numel == layer.out_features else None
        return Step(name, "Linear", l2.value, linf, l2.method, numel, weight=head, layer=layer,
                    input_shape=input_shape)
    gain = _layer_gain(layer, input_shape)
    if isinstance(gain, str):
        return gain
    l2, linf, method = gain
    return Step(name, kind, l2, linf, method, numel, keeps_order=isinstance(layer, _ORDER_KEEPING_MODULES))


def _batchnorm_scale(layer: nn.Module) -> torch.Tensor | None:
    """gamma / sqrt(var + eps) per channel of an eval BatchNorm (float64); None when not a fixed map."""
    if layer.training or layer.running_var is None:
        return None
    scale = (layer.running_var.double() + layer.eps).rsqrt()
    return scale * layer.weight.detach().double() if layer.weight is not None else scale


def folded_step(previous: Step, norm: nn.Module, name: str) -> Step | None:
    """`previous` (a Conv2d / Linear step) with the eval BatchNorm `norm` after it folded in: the norm
    of diag(scale) W, no larger and usually smaller than max|scale| times that of W."""
    if previous.layer is None or not isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return None
    scale = _batchnorm_scale(norm)
    channels = getattr(previous.layer, "out_channels", getattr(previous.layer, "out_features", None))
    if scale is None or scale.numel() != channels:
        return None
    layer = copy.deepcopy(previous.layer)
    if parametrize.is_parametrized(layer):
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    with torch.no_grad():
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight = nn.Parameter(layer.weight.detach().double() * scale.to(layer.weight.device).view(shape))
    step = module_step(layer, f"{previous.name}+{name}", previous.input_shape, (previous.output_numel,))
    if isinstance(step, str):
        return None
    step.kind, step.output_numel = f"{previous.kind}+BatchNorm", previous.output_numel
    step.method += " (BatchNorm folded in)"
    return step


def _layer_gain(layer: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, float, str] | str:
    if isinstance(layer, _ORDER_KEEPING_MODULES):
        return 1.0, 1.0, "keeps distances"
    if isinstance(layer, _ONE_LIPSCHITZ_MODULES):
        return 1.0, 1.0, "1-Lipschitz activation"
    if isinstance(layer, nn.Sigmoid):
        return 0.25, 0.25, "sigmoid: slope at most 1/4"
    if isinstance(layer, (nn.LeakyReLU, nn.ELU)):
        slope = max(1.0, abs(layer.negative_slope if isinstance(layer, nn.LeakyReLU) else layer.alpha))
        return slope, slope, "largest slope of the activation"
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale = _batchnorm_scale(layer)
        if scale is None:
            return "a BatchNorm without fixed running statistics is not a fixed map"
        gain = float(scale.abs().max())
        return gain, gain, "largest |gamma| / sqrt(var + eps)"
    if isinstance(layer, nn.MaxPool2d):
        overlap = pool_overlap(layer, input_shape)
        # Each output moves by at most the largest move in its window; a pixel is in `overlap` windows.
        return math.sqrt(overlap), 1.0, f"max pooling, a pixel in at most {overlap} windows"
    if isinstance(layer, nn.AvgPool2d):
        return _average_pool_gain(layer, input_shape)
    return NOT_COVERED


def _average_pool_gain(layer: nn.AvgPool2d, input_shape: tuple[int, ...]) -> tuple[float, float, str]:
    """|sum of a window's m moves| <= sqrt(m) * their l2 norm, divided by the window's divisor D."""
    overlap = pool_overlap(layer, input_shape)
    kh, kw = _pair(layer.kernel_size)
    if layer.divisor_override:
        # sqrt(m) / D <= sqrt(kh kw) / D in l2; m / D <= kh kw / D in l-infinity.
        window = kh * kw / layer.divisor_override
        return math.sqrt(overlap * kh * kw) / layer.divisor_override, window, "average pooling (divisor override)"
    if layer.count_include_pad and not layer.ceil_mode:
        # D = kh kw >= m, so sqrt(m) / D <= 1 / sqrt(kh kw).
        return math.sqrt(overlap / (kh * kw)), 1.0, f"average pooling, a pixel in at most {overlap} windows"
    # D >= m (windows cut by the border), so sqrt(m) / D <= 1.
    return math.sqrt(overlap), 1.0, f"average pooling, a pixel in at most {overlap} windows"


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def pool_overlap(layer: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The most windows of a 2-D pooling layer that any one input pixel belongs to."""
    kernel, stride, padding = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size), _pair(layer.padding)
    dilation = _pair(getattr(layer, "dilation", 1))
    total = 1
    for n, k, s, p, d in zip(input_shape[-2:], kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        n_out = (n + 2 * p - span + (s - 1 if layer.ceil_mode else 0)) // s + 1
        counts = [0] * n
        for o in range(n_out):
            for i in range(k):
                y = o * s - p + i * d
                if 0 <= y < n:
                    counts[y] += 1
        total *= max(counts)
    return total


def function_gain(graph: fx.GraphModule, node: fx.Node, source: fx.Node
                  ) -> tuple[float, float, str, bool] | str:
    """(l2, linf, basis, keeps order) of a functional operation on the chain's value `source`."""
    target, method = node.target, node.op == "call_method"
    if target in _ORDER_KEEPING_FUNCTIONS or (method and target in _ORDER_KEEPING_METHODS):
        return 1.0, 1.0, "reshape", True
    if target in _REORDERING_FUNCTIONS or (method and target in _REORDERING_METHODS):
        return 1.0, 1.0, "permutation", False
    if target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        return (1.0, 1.0, "constant padding", False) if mode == "constant" else f"padding mode {mode!r}: {NOT_COVERED}"
    if target in _ONE_LIPSCHITZ_FUNCTIONS or (method and target in _ONE_LIPSCHITZ_METHODS):
        return 1.0, 1.0, "1-Lipschitz activation", False
    if target in _SIGMOID_FUNCTIONS or (method and target == "sigmoid"):
        return 0.25, 0.25, "sigmoid: slope at most 1/4", False
    return _constant_operation(graph, node, source)


def _constant_operation(graph: fx.GraphModule, node: fx.Node, source: fx.Node
                        ) -> tuple[float, float, str, bool] | str:
    """x + c, x - c, c - x, x * c, x / c for a constant c that does not broadcast x to more values."""
    others = [arg for arg in node.args if arg is not source]
    if node.kwargs or len(node.args) != 2 or len(others) != 1:
        return NOT_COVERED
    constant = _constant(graph, others[0])
    if constant is None:
        return NOT_COVERED
    if tuple(node.meta["tensor_meta"].shape) != tuple(source.meta["tensor_meta"].shape):
        return "a constant that broadcasts the value to more entries"
    target, source_first = node.target, node.args[0] is source
    if target in _ADD or (target in _SUB and source_first):
        return 1.0, 1.0, "shift by a constant", True
    if target in _SUB:
        return 1.0, 1.0, "negation and shift", False
    if target in _MUL:
        gain = float(constant.abs().max())
        return gain, gain, "scaling by a constant", False
    if target in _DIV and source_first and bool((constant != 0).all()):
        gain = float((1.0 / constant.double().abs()).max())
        return gain, gain, "division by a constant", False
    return NOT_COVERED


def _constant(graph: fx.GraphModule, arg) -> torch.Tensor | None:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return torch.tensor(float(arg))
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = graph
        for part in arg.target.split("."):
            value = getattr(value, part, None)
        return value.detach() if isinstance(value, torch.Tensor) else None
    return None
