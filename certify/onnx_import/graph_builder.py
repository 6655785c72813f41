"""The torch.fx graph builder: ONNX values (constants or batch tensors, see the batch-axis notes
in certify.onnx_import.reader) and the emitting of ops that the converters use."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import onnx
import torch
import torch.fx as fx
from torch import nn

from certify.common.errors import UserError
from certify.onnx_import.validate import _READ_HINT, _first_line, _node_label, _tensor_to_torch

# Size of the example batch the ops run on while building: not 1 (a fixed 1 is what we rewrite),
# and not a size that is common in small layers, so that a mixed-up batch axis shows.
_EXAMPLE_BATCH = 3

@dataclasses.dataclass
class _Value:
    """One ONNX value: a constant (`node` is None, `example` is the value itself) or a tensor that
    depends on the input (`example` is its value on the example batch)."""

    example: torch.Tensor
    node: fx.Node | None = None
    offset: int = 0  # see the module docstring; only meaningful for non-constants

    @property
    def is_const(self) -> bool:
        return self.node is None

    @property
    def onnx_shape(self) -> tuple[int, ...]:
        """The shape this value has in the ONNX graph run on one sample."""
        shape = tuple(self.example.shape)
        if self.is_const:
            return shape
        return shape[1:] if self.offset else (1, *shape[1:])

    @property
    def onnx_rank(self) -> int:
        return len(self.onnx_shape)


class _GraphBuilder:
    def __init__(self, graph: onnx.GraphProto, converters: dict[str, Callable]):
        # The op table is passed in: the converters build on this class, so it cannot import them.
        self.converters = converters
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.values: dict[str, _Value] = {}
        self.fused: set[str] = set()  # first outputs of nodes folded into an earlier one
        self._const_nodes: dict[int, fx.Node] = {}
        self._counters: dict[str, int] = {}
        self.label = ""
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        self._graph_outputs = {o.name for o in graph.output}

    # -- errors ---------------------------------------------------------------------------------

    def refuse(self, why: str) -> UserError:
        return UserError(f"node {self.label}: {why}",
                         "certify converts per-sample classifier graphs; re-export the model in a "
                         "plainer form or report it")

    # -- conversion -------------------------------------------------------------------------------

    def convert(self, node: onnx.NodeProto, index: int) -> None:
        self.label = f"{_node_label(node, index)} ({node.op_type})"
        missing = [name for name in node.input if name and name not in self.values]
        if missing:
            raise self.refuse(f"its input {missing[0]!r} is not computed before it")
        inputs = [self.values[name] if name else None for name in node.input]
        try:
            attrs = {a.name: _attribute(a) for a in node.attribute}
            result = self.converters[node.op_type](self, node, attrs, *inputs)
        except UserError:
            raise
        # The forms of an op that a converter does not expect (an attribute missing or of another
        # type, shapes that torch refuses, sizes that overflow) end up here. Other exceptions
        # (AttributeError, AssertionError, ...) are bugs of the converter and stay visible.
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError, ZeroDivisionError,
                OverflowError) as error:
            raise self.refuse(f"cannot be converted ({_first_line(error)})") from error
        if not isinstance(result, (list, _Value)):
            raise self.refuse("cannot be converted")
        results = result if isinstance(result, list) else [result]
        for name, value in zip(node.output, results):
            self._check_batch(value)
            self.values[name] = value
        for name in node.output[len(results):]:
            if name and (name in self._consumers or name in self._graph_outputs):
                raise self.refuse(f"its output {name!r} is used, which certify does not support")

    def _check_batch(self, value: _Value) -> None:
        if value.is_const:
            return
        shape = tuple(value.example.shape)
        if len(shape) < 1 or shape[0] != _EXAMPLE_BATCH:
            raise self.refuse("it mixes the samples of a batch (it moves or merges the batch axis)")

    def set_output(self, name: str) -> None:
        value = self.values.get(name)
        if value is None:
            raise UserError(f"the model's output {name!r} is not computed by any node",
                            "check that the right file was exported")
        if value.is_const:
            raise UserError("the model's output does not depend on its input",
                            "check that the right file was exported")
        rest = tuple(value.example.shape[1:])
        if math.prod(rest) == 0:
            raise UserError(f"the model's output has shape {list(value.onnx_shape)}: no values per sample",
                            "certify needs a classifier whose output is one logit per class")
        if not value.example.is_floating_point():
            raise UserError(f"the model's output is of type {value.example.dtype}, not float logits",
                            "export the model so that it outputs one float logit per class")
        if sum(d != 1 for d in rest) > 1:
            raise UserError(
                f"the model's output has shape {list(value.onnx_shape)} per sample, not (classes,)",
                "certify needs a classifier whose output is one logit per class",
            )
        node = value.node
        if len(rest) != 1:  # e.g. [1, 10, 1, 1] or a rank-1 output without batch axis
            node = self.graph.call_function(torch.reshape, (node, (-1, math.prod(rest))))
        self.graph.output(node)

    # -- emitting ops -----------------------------------------------------------------------------

    def call(self, target: Callable, *args: Any, **kwargs: Any) -> _Value:
        """Apply `target` (a torch function or a new submodule) to values and plain arguments.

        With constant arguments only, the result is computed now and becomes a constant; otherwise
        an fx node is added. Either way the example result gives the output shape.
        """
        with torch.no_grad():
            example = target(*_map_values(args, lambda v: v.example),
                             **_map_values(kwargs, lambda v: v.example))
        variables = [v for v in _flat_values((args, kwargs)) if not v.is_const]
        if not variables:
            return _Value(example.detach())
        fx_args = _map_values(args, self.fx_node)
        fx_kwargs = _map_values(kwargs, self.fx_node)
        if isinstance(target, nn.Module):
            node = self.graph.call_module(self._add_module(target), fx_args, fx_kwargs)
        else:
            node = self.graph.call_function(target, fx_args, fx_kwargs)
        return _Value(example.detach(), node, variables[0].offset)

    def fx_node(self, value: _Value) -> fx.Node:
        if not value.is_const:
            return value.node
        key = id(value)
        if key not in self._const_nodes:
            name = self._unique_name("const")
            self.root.register_buffer(name, value.example.clone())
            self._const_nodes[key] = self.graph.get_attr(name)
        return self._const_nodes[key]

    def _add_module(self, module: nn.Module) -> str:
        name = self._unique_name(type(module).__name__.lower())
        self.root.add_module(name, module)
        return name

    def _unique_name(self, kind: str) -> str:
        count = self._counters.get(kind, 0)
        self._counters[kind] = count + 1
        return f"{kind}_{count}"

    # -- helpers for converters ---------------------------------------------------------------------

    def reshape(self, value: _Value, onnx_shape: tuple[int, ...], offset: int | None = None) -> _Value:
        """Reshape to a resolved one-sample ONNX shape; the batch axis stays dynamic.

        The result keeps ONNX axis 0 as the batch axis (offset 0) where that axis has size 1, unless
        `offset` says otherwise. Elements of one sample are contiguous, so this is the same
        per-sample reshape for every N.
        """
        if value.is_const:
            return _Value(value.example.reshape(onnx_shape))
        if offset is None:
            offset = 0 if onnx_shape and onnx_shape[0] == 1 else 1
        if offset == 0 and not (onnx_shape and onnx_shape[0] == 1):
            raise self.refuse(f"it needs a batch axis of size 1, not shape {list(onnx_shape)}")
        target = tuple(onnx_shape[1:] if offset == 0 else onnx_shape)
        if tuple(value.example.shape[1:]) == target:
            return dataclasses.replace(value, offset=offset)
        if len(target) == 1 and value.example.dim() > 1:
            result = self.call(torch.flatten, value, 1)
        else:
            result = self.call(torch.reshape, value, (-1, *target))
        return dataclasses.replace(result, offset=offset)

    def unbatched(self, value: _Value, rank: int = 0) -> _Value:
        """The same value as a tensor without ONNX batch axis (offset 1), its ONNX shape padded
        with leading 1s to `rank` (which ONNX broadcasting does anyway). Ops that work along or
        broadcast against ONNX axis 0 use this form."""
        if value.is_const:
            return value
        shape = (1,) * (rank - value.onnx_rank) + value.onnx_shape
        if value.offset == 1 and len(shape) == value.onnx_rank:
            return value
        return self.reshape(value, shape, offset=1)

    def batched(self, value: _Value) -> _Value:
        """The same value with its ONNX axis 0 (of size 1) as the batch axis (offset 0)."""
        if value.is_const or value.offset == 0:
            return value
        return self.reshape(value, value.onnx_shape, offset=0)

    def broadcastable(self, *values: _Value) -> list[_Value]:
        """Values that torch broadcasts exactly as ONNX does, with the batch axis lined up."""
        variables = [v for v in values if not v.is_const]
        if not variables:
            return list(values)
        rank = max(v.onnx_rank for v in values)
        offset = variables[0].offset
        same_form = all(v.offset == offset and v.onnx_rank == rank for v in variables)
        # A constant of full rank lines up with the batch axis: fine if its axis 0 has size 1.
        constants_fit = all(offset == 1 or v.onnx_rank < rank or v.example.shape[0] == 1
                            for v in values if v.is_const)
        if same_form and constants_fit:
            return list(values)
        return [self.unbatched(v, rank) for v in values]

    def bias_after(self, node: onnx.NodeProto, out_features: int,
                   out_rank: int) -> tuple[torch.Tensor, str] | None:
        """If `node`'s output feeds only an `Add` of a plain bias constant (shape (out,) or
        (1, ..., 1, out)), return that bias and the Add's output name, and mark the Add as fused."""
        output = node.output[0]
        users = self._consumers.get(output, [])
        if output in self._graph_outputs or len(users) != 1 or users[0].op_type != "Add":
            return None
        add = users[0]
        other = [name for name in add.input if name != output]
        if len(other) != 1 or other[0] not in self.values or not self.values[other[0]].is_const:
            return None
        bias = self.values[other[0]].example
        shape = tuple(bias.shape)
        if not shape or shape[-1] != out_features or any(d != 1 for d in shape[:-1]) \
                or len(shape) > out_rank or not bias.is_floating_point():
            return None
        self.fused.add(add.output[0])
        return bias.reshape(out_features), add.output[0]


def _attribute(attribute: onnx.AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise UserError(f"the attribute {attribute.name!r} is not UTF-8 text", _READ_HINT) from None
    if isinstance(value, onnx.TensorProto):
        return _tensor_to_torch(value, f"constant {attribute.name!r}")
    return value


def _flat_values(tree: Any) -> list[_Value]:
    if isinstance(tree, _Value):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [v for item in tree for v in _flat_values(item)]
    if isinstance(tree, dict):
        return [v for item in tree.values() for v in _flat_values(item)]
    return []


def _map_values(tree: Any, fn: Callable[[_Value], Any]) -> Any:
    if isinstance(tree, _Value):
        return fn(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_values(item, fn) for item in tree)
    if isinstance(tree, dict):
        return {key: _map_values(item, fn) for key, item in tree.items()}
    return tree


def _ints(value: _Value | None) -> list[int] | None:
    """A constant integer input (shapes, axes, pads) as a Python list."""
    if value is None:
        return None
    if not value.is_const:
        raise UserError("a shape, axes or pads input depends on the model input",
                        "export the model with constant shapes (torch.onnx.export does by default)")
    return [int(v) for v in value.example.reshape(-1).tolist()]
