"""Element-wise affine maps by constants on images, rewritten as 1x1 depthwise convolutions.

Why: auto_LiRPA 0.3 bounds convolutions in "patches" mode, and its Add/Sub/Mul/Div operators
cannot take patches that arrive from a following convolution (assertions in
operators/bivariate.py). So an input normalization in front of a CNN -- `--mean/--std`, or a
Sub/Div by constants at the start of the ONNX graph -- made CROWN fail with an AssertionError.
`x * a + b` per channel is exactly a 1x1 convolution with groups = channels, which auto_LiRPA
bounds like any other convolution. Remove this once auto_LiRPA handles such ops in patches mode.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

_OPS = {torch.add: "add", operator.add: "add", torch.sub: "sub", operator.sub: "sub",
        torch.mul: "mul", operator.mul: "mul", torch.div: "div", operator.truediv: "div"}


def _channel_affine(channels: int, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1, groups=channels, bias=True)
    with torch.no_grad():
        conv.weight.copy_(scale.expand(channels).reshape(channels, 1, 1, 1))
        conv.bias.copy_(shift.expand(channels))
    return conv.eval()


def _per_channel(value: torch.Tensor, channels: int) -> torch.Tensor | None:
    """The constant as (channels,) if it broadcasts against (N, C, H, W) per channel only."""
    if not value.is_floating_point():
        return None
    if value.numel() == 1:
        return value.reshape(1).expand(channels).float()
    shape = list(value.shape)
    while shape and shape[0] == 1:
        shape.pop(0)
    if shape == [channels, 1, 1]:
        return value.reshape(channels).float()
    return None


def with_linear_biases(module: nn.Module) -> nn.Module:
    """`module` (a copy, if anything changes) with a zero bias in every bias-free nn.Linear.

    auto_LiRPA 0.3 traces a Linear without bias as a bare MatMul, and its MatMul IBP cannot take
    the specification matrix C: bounding a model that ends in such a layer raised a TypeError.
    A zero bias computes the same function and is traced as a Linear (Gemm), which it bounds.
    """
    names = [name for name, layer in module.named_modules() if isinstance(layer, nn.Linear) and layer.bias is None]
    if not names:
        return module
    module = copy.deepcopy(module)
    for name in names:
        layer = module.get_submodule(name)
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device),
                                  requires_grad=False)
    return module


def affine_ops_as_convs(module: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """`module` with every x (+, -, *, /) constant on a 4-D image tensor made a depthwise 1x1 conv
    (and every bias-free Linear given a zero bias, see with_linear_biases): what auto_LiRPA bounds.

    Returns the module unchanged when it has no such op, or when it cannot be traced.
    """
    module = with_linear_biases(module)
    if len(input_shape) != 3:
        return module
    try:
        traced = fx.symbolic_trace(module)
    except Exception:  # a module fx cannot trace is left to auto_LiRPA as it is
        return module
    example = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))
    ShapeProp(traced).propagate(example)
    constants = {node.name: _constant(traced, node) for node in traced.graph.nodes if node.op == "get_attr"}
    changed = 0
    for node in list(traced.graph.nodes):
        kind = _OPS.get(node.target) if node.op == "call_function" else None
        meta = node.meta.get("tensor_meta")
        if kind is None or len(node.args) != 2 or node.kwargs or meta is None or len(meta.shape) != 4:
            continue
        a, b = node.args
        a_const = constants.get(a.name) if isinstance(a, fx.Node) else None
        b_const = constants.get(b.name) if isinstance(b, fx.Node) else None
        channels = int(meta.shape[1])
        if b_const is not None and isinstance(a, fx.Node) and a_const is None:
            x, c, const_first = a, _per_channel(b_const, channels), False
        elif a_const is not None and isinstance(b, fx.Node) and b_const is None:
            x, c, const_first = b, _per_channel(a_const, channels), True
        else:
            continue
        x_meta = x.meta.get("tensor_meta")
        if c is None or x_meta is None or tuple(x_meta.shape) != tuple(meta.shape):
            continue
        one, zero = torch.ones(channels), torch.zeros(channels)
        if kind == "add":
            scale, shift = one, c
        elif kind == "sub":
            scale, shift = (-one, c) if const_first else (one, -c)
        elif kind == "mul":
            scale, shift = c, zero
        elif not const_first and bool((c != 0).all()):
            scale, shift = 1 / c, zero
        else:
            continue  # constant / x is not affine
        name = f"channel_affine_{changed}"
        traced.add_submodule(name, _channel_affine(channels, scale, shift))
        with traced.graph.inserting_before(node):
            replacement = traced.graph.call_module(name, (x,))
        replacement.meta = dict(node.meta)  # same shape: a following op may be rewritten too
        node.replace_all_uses_with(replacement)
        traced.graph.erase_node(node)
        changed += 1
    if not changed:
        return module
    traced.graph.eliminate_dead_code()
    traced.recompile()
    rewritten = traced.eval()
    with torch.no_grad():
        expected, got = module(example), rewritten(example)
    # The rewrite must compute the same function: a mismatch is a bug here, never silently used.
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"channel_affine rewrite changed the model's outputs by {(expected - got).abs().max():.3g}")
    return rewritten


def _constant(traced: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    value = traced
    for part in node.target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value.detach() if isinstance(value, torch.Tensor) else None
