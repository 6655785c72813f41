"""One converter per ONNX op: (builder, node, attributes, *input values) -> value(s), registered in
the one table CONVERTERS, whose keys are the supported ops."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from certify.common.errors import UserError
from certify.onnx_import.graph_builder import _GraphBuilder, _ints, _Value


def _gemm(b: _GraphBuilder, node, attrs, a: _Value, w: _Value, c: _Value | None = None):
    if a.is_const or not w.is_const or attrs.get("transA", 0):
        raise b.refuse("only Gemm(input, constant weight) with transA=0 is supported")
    weight = w.example if attrs.get("transB", 0) else w.example.t()  # as (out, in)
    weight = weight * float(attrs.get("alpha", 1.0))
    out_features = weight.shape[0]
    beta = float(attrs.get("beta", 1.0))
    plain_bias = c is not None and c.is_const and c.example.numel() in (1, out_features) \
        and all(d == 1 for d in c.example.shape[:-1])
    bias = (beta * c.example.reshape(-1)).expand(out_features) if plain_bias else None
    result = b.call(_linear(weight, bias), a)
    if c is not None and not plain_bias:
        result, c = b.broadcastable(result, b.call(torch.mul, c, beta))
        result = b.call(torch.add, result, c)
    return result


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _matmul(b: _GraphBuilder, node, attrs, a: _Value, c: _Value):
    if a.is_const and c.is_const:
        return b.call(torch.matmul, a, c)
    # Dense layers: x @ W (W on the last axis, whatever the rank) and W @ x on a vector.
    if not a.is_const and c.is_const and c.onnx_rank == 2:
        return _dense(b, node, c.example.t(), a if a.onnx_rank > 1 else b.unbatched(a))
    if a.is_const and a.onnx_rank == 2 and c.onnx_rank == 1:
        return _dense(b, node, a.example, b.unbatched(c))
    # Otherwise a product of stacks of matrices. ONNX axis 0 may stay the batch axis only where
    # it is a stack axis on both sides; else both operands go without batch axis, same rank.
    if a.onnx_rank == 1 or c.onnx_rank == 1:
        raise b.refuse("a product of a vector with a stack of matrices is not supported")
    rank = max(a.onnx_rank, c.onnx_rank)
    keeps_batch = rank >= 3 and all(
        (not v.is_const and v.offset == 0 and v.onnx_rank == rank)
        or (v.is_const and (v.onnx_rank < rank or v.example.shape[0] == 1)) for v in (a, c))
    if not keeps_batch:
        a, c = b.unbatched(a, rank), b.unbatched(c, rank)
    return b.call(torch.matmul, a, c)


def _dense(b: _GraphBuilder, node, weight: torch.Tensor, x: _Value) -> _Value:
    """nn.Linear with `weight` (out, in), taking the bias of an Add that follows, if any."""
    fused = b.bias_after(node, weight.shape[0], x.onnx_rank)
    result = b.call(_linear(weight, None if fused is None else fused[0]), x)
    if fused is not None:
        b.values[fused[1]] = result
    return result


def _explicit_pads(b: _GraphBuilder, attrs, spatial, kernel, strides, dilations) -> list[int]:
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        return list(attrs.get("pads", [0] * 2 * len(spatial)))
    if auto_pad == "VALID":
        return [0] * 2 * len(spatial)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise b.refuse(f"auto_pad={auto_pad} is not supported")
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return begin + end


def _torch_pad_2d(pads: list[int]) -> tuple[int, int, int, int]:
    top, left, bottom, right = pads
    return (left, right, top, bottom)


def _nchw(b: _GraphBuilder, x: _Value) -> _Value:
    if x.is_const or x.onnx_rank != 4:
        raise b.refuse("only 2-D images (N, C, H, W) computed from the input are supported")
    return b.batched(x)


def _conv(b: _GraphBuilder, node, attrs, x: _Value, w: _Value, bias: _Value | None = None):
    x = _nchw(b, x)
    if not w.is_const or (bias is not None and not bias.is_const):
        raise b.refuse("the weights must be constants")
    kernel = tuple(w.example.shape[2:])
    strides = tuple(attrs.get("strides", [1, 1]))
    dilations = tuple(attrs.get("dilations", [1, 1]))
    pads = _explicit_pads(b, attrs, x.example.shape[2:], kernel, strides, dilations)
    if pads[:2] != pads[2:]:  # asymmetric: pad explicitly, then convolve without padding
        x = b.call(F.pad, x, _torch_pad_2d(pads))
        pads = [0, 0, 0, 0]
    group = int(attrs.get("group", 1))
    conv = nn.Conv2d(x.example.shape[1], w.example.shape[0], kernel, stride=strides,
                     padding=tuple(pads[:2]), dilation=dilations, groups=group, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(w.example)
        if bias is not None:
            conv.bias.copy_(bias.example)
    return b.call(conv, x)


def _pool(kind: str):
    def convert(b: _GraphBuilder, node, attrs, x: _Value):
        x = _nchw(b, x)
        kernel = tuple(attrs["kernel_shape"])
        strides = tuple(attrs.get("strides", [1, 1]))
        dilations = tuple(attrs.get("dilations", [1, 1]))
        pads = _explicit_pads(b, attrs, x.example.shape[2:], kernel, strides, dilations)
        ceil_mode = bool(attrs.get("ceil_mode", 0))
        symmetric = pads[:2] == pads[2:] and all(p <= k // 2 for p, k in zip(pads, kernel))
        if kind == "max":
            if not symmetric:
                raise b.refuse("MaxPool with asymmetric or large pads is not supported")
            pool = nn.MaxPool2d(kernel, strides, tuple(pads[:2]), dilations, ceil_mode=ceil_mode)
            return b.call(pool, x)
        if dilations != (1, 1):
            raise b.refuse("AveragePool with dilations is not supported")
        include_pad = bool(attrs.get("count_include_pad", 0))
        if not symmetric:
            if not include_pad:
                raise b.refuse("AveragePool with asymmetric pads needs count_include_pad=1")
            x = b.call(F.pad, x, _torch_pad_2d(pads))
            pads = [0, 0, 0, 0]
        pool = nn.AvgPool2d(kernel, strides, tuple(pads[:2]), ceil_mode=ceil_mode,
                            count_include_pad=include_pad)
        return b.call(pool, x)

    return convert


def _global_average_pool(b: _GraphBuilder, node, attrs, x: _Value):
    x = _nchw(b, x)
    # One window over the whole image: a plain AvgPool2d, which auto_LiRPA bounds with CROWN.
    return b.call(nn.AvgPool2d(tuple(x.example.shape[2:])), x)


def _batch_norm(b: _GraphBuilder, node, attrs, x, scale, shift, mean, var):
    if x.is_const or not 2 <= x.onnx_rank <= 5:
        raise b.refuse("only (N, C, ...) inputs computed from the model input are supported")
    x = b.batched(x)
    if not all(v.is_const for v in (scale, shift, mean, var)) or attrs.get("spatial", 1) != 1 \
            or attrs.get("training_mode", 0):
        raise b.refuse("only inference-mode batch norm with constant statistics is supported")
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.onnx_rank]
    norm = kind(x.example.shape[1], eps=float(attrs.get("epsilon", 1e-5)))
    with torch.no_grad():
        norm.weight.copy_(scale.example)
        norm.bias.copy_(shift.example)
        norm.running_mean.copy_(mean.example)
        norm.running_var.copy_(var.example)
    return b.call(norm.eval(), x)


def _activation(make: Callable[[dict], nn.Module]):
    def convert(b: _GraphBuilder, node, attrs, x: _Value):
        return b.call(make(attrs), x)

    return convert


def _elementwise(function: Callable):
    def convert(b: _GraphBuilder, node, attrs, x: _Value):
        return b.call(function, x)

    return convert


def _binary(function: Callable):
    def convert(b: _GraphBuilder, node, attrs, x: _Value, y: _Value):
        x, y = b.broadcastable(x, y)
        if function is torch.div and not x.example.is_floating_point() \
                and not y.example.is_floating_point():
            return b.call(torch.div, x, y, rounding_mode="trunc")  # ONNX integer division
        return b.call(function, x, y)

    return convert


def _identity(b: _GraphBuilder, node, attrs, x: _Value, *unused):
    return x


def _constant(b: _GraphBuilder, node, attrs):
    if "value" in attrs:
        return _Value(attrs["value"])
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            value = torch.tensor(attrs[key], dtype=dtype)
            if not torch.isfinite(value).all():
                raise UserError(f"node {b.label} holds NaN or infinite values",
                                "fix or retrain the model; certify only bounds finite weights")
            return _Value(value)
    raise b.refuse("only tensor, float and int constants are supported")


def _resolve_reshape(shape: tuple[int, ...], target: list[int], allow_zero: bool) -> tuple[int, ...]:
    resolved = [shape[i] if d == 0 and not allow_zero else d for i, d in enumerate(target)]
    if -1 in resolved:
        known = math.prod(d for d in resolved if d != -1)
        resolved[resolved.index(-1)] = math.prod(shape) // known if known else 0
    if math.prod(resolved) != math.prod(shape):
        raise ValueError(f"cannot reshape {list(shape)} to {target}")
    return tuple(resolved)


def _reshape(b: _GraphBuilder, node, attrs, x: _Value, shape: _Value):
    target = _resolve_reshape(x.onnx_shape, _ints(shape), bool(attrs.get("allowzero", 0)))
    return b.reshape(x, target)


def _flatten(b: _GraphBuilder, node, attrs, x: _Value):
    shape = x.onnx_shape
    axis = attrs.get("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    return b.reshape(x, (math.prod(shape[:axis]), math.prod(shape[axis:])))


def _squeeze(b: _GraphBuilder, node, attrs, x: _Value, axes: _Value | None = None):
    shape = x.onnx_shape
    axes = attrs.get("axes") if axes is None else _ints(axes)
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = {a % len(shape) for a in axes}
    if any(shape[a] != 1 for a in axes):
        raise b.refuse("it squeezes an axis whose size is not 1")
    return b.reshape(x, tuple(d for i, d in enumerate(shape) if i not in axes))


def _unsqueeze(b: _GraphBuilder, node, attrs, x: _Value, axes: _Value | None = None):
    shape = list(x.onnx_shape)
    axes = attrs.get("axes") if axes is None else _ints(axes)
    rank = len(shape) + len(axes)
    for axis in sorted(a % rank for a in axes):
        shape.insert(axis, 1)
    return b.reshape(x, tuple(shape))


def _transpose(b: _GraphBuilder, node, attrs, x: _Value):
    perm = list(attrs.get("perm", range(x.onnx_rank - 1, -1, -1)))
    if x.is_const:
        return _Value(x.example.permute(perm))
    if x.offset == 0 and perm[0] != 0:
        x = b.unbatched(x)  # the size-1 ONNX axis 0 moves: it is no longer the batch axis
    if x.offset == 0:
        return b.call(torch.permute, x, tuple(perm))
    return b.call(torch.permute, x, (0, *(p + 1 for p in perm)))


def _concat(b: _GraphBuilder, node, attrs, *parts: _Value):
    axis = attrs["axis"] % parts[0].onnx_rank
    if all(p.is_const for p in parts):
        return b.call(torch.cat, list(parts), axis)
    if any(p.is_const for p in parts):
        raise b.refuse("concatenating constants with input-dependent tensors is not supported")
    if axis == 0 or any(p.offset != parts[0].offset for p in parts):
        parts = tuple(b.unbatched(p) for p in parts)
    return b.call(torch.cat, list(parts), axis + parts[0].offset)


def _pad(b: _GraphBuilder, node, attrs, x: _Value, pads: _Value | None = None,
         value: _Value | None = None, axes: _Value | None = None):
    mode = attrs.get("mode", "constant")
    rank = x.onnx_rank
    pads = attrs.get("pads") if pads is None else _ints(pads)
    fill = float(attrs.get("value", 0.0)) if value is None else float(value.example.reshape(-1)[0])
    axes = list(range(rank)) if axes is None else [a % rank for a in _ints(axes)]
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[i + len(axes)]
    if not any(begin) and not any(end):
        return x  # a no-op Pad: dropped (auto_LiRPA 0.3's graph wrapper trips on it)
    if mode != "constant":
        raise b.refuse(f"Pad mode {mode!r} is not supported (only 'constant')")
    first = min(a for a in range(rank) if begin[a] or end[a])
    if first == 0 and not x.is_const:
        x = b.unbatched(x)  # padding ONNX axis 0: it is no longer the batch axis
    torch_pads = tuple(p for a in reversed(range(first, rank)) for p in (begin[a], end[a]))
    return b.call(F.pad, x, torch_pads, mode="constant", value=fill)


CONVERTERS: dict[str, Callable] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "Relu": _activation(lambda attrs: nn.ReLU()),
    "Sigmoid": _activation(lambda attrs: nn.Sigmoid()),
    "Tanh": _activation(lambda attrs: nn.Tanh()),
    "LeakyRelu": _activation(lambda attrs: nn.LeakyReLU(float(attrs.get("alpha", 0.01)))),
    "Elu": _activation(lambda attrs: nn.ELU(float(attrs.get("alpha", 1.0)))),
    "Gelu": _activation(lambda attrs: nn.GELU(approximate=attrs.get("approximate", "none"))),
    "Erf": _elementwise(torch.erf),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Pad": _pad,
    "AveragePool": _pool("average"),
    "MaxPool": _pool("max"),
    "GlobalAveragePool": _global_average_pool,
    "BatchNormalization": _batch_norm,
    "Identity": _identity,
    "Dropout": _identity,
    "Constant": _constant,
    "Concat": _concat,
}

# The ops certify imports: exactly those with a converter.
SUPPORTED_OPS = frozenset(CONVERTERS)
