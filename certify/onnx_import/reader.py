"""ONNX classifier -> a plain torch module that auto_LiRPA can trace and bound.

`import_onnx` reads the file with `onnx`, validates it (checker + strict shape inference), then
walks the nodes in their (topological) order and writes a `torch.fx` graph of ordinary pieces:
`nn.Conv2d` / `nn.Linear` / `nn.BatchNorm*d` / pooling / activation submodules holding the weights,
`torch` functions for the element-wise and shape ops, and buffers for the other constants. The
generated `forward` is straight-line code, so torch.jit tracing (what auto_LiRPA 0.3 does) sees
exactly the ops we chose, and the layer rewrites of `harden` find ordinary submodules.

Batch axis. Many third-party graphs fix the batch to 1 ([1,784,1], [1,1,28,28]). We read every
graph as "what it computes on ONE sample" and let the module run N samples at once: each value
that depends on the input is a torch tensor of shape (N, ...), where either
  offset 0: the torch axis 0 stands for the ONNX axis 0, which has size 1 in the graph, or
  offset 1: torch axis 0 is extra; the value has no ONNX batch axis (rank-1 inputs such as [5],
            or values after an op that treated ONNX axis 0 as an ordinary axis).
Shape ops are resolved on the one-sample ONNX shape, so a fixed "1" or a -1 in a Reshape keeps
working for any N. An op that works along ONNX axis 0 (a Transpose moving it, a Concat along it,
a broadcast against it) first turns its input into the offset-1 form, where that axis is an
ordinary one. While building, every op also runs on an example batch, which gives the shapes the
conversion needs and folds constant sub-graphs.

`check_against_onnxruntime` compares the module with onnxruntime; `import_onnx(check=True)` runs it
on a few random inputs so that a conversion mistake can never pass silently.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from certify.onnx_import.metadata import parse_harden_data
from certify.onnx_import.parity import check_against_onnxruntime
from certify.common.errors import UserError

SUPPORTED_OPS = frozenset({
    "Gemm", "MatMul", "Conv", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Add", "Sub", "Mul", "Div",
    "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Pad", "AveragePool", "MaxPool",
    "GlobalAveragePool", "BatchNormalization", "Identity", "Dropout", "Constant", "Concat",
})

# Ops that only move values around: a Softmax followed by these still ends the model.
_SHAPE_ONLY_OPS = frozenset({"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze"})

# Size of the example batch the ops run on while building: not 1 (a fixed 1 is what we rewrite),
# and not a size that is common in small layers, so that a mixed-up batch axis shows.
_EXAMPLE_BATCH = 3


@dataclasses.dataclass
class ImportedModel:
    module: torch.nn.Module  # eval mode, float32, takes (N, *input_shape), returns (N, num_classes)
    input_shape: tuple[int, ...]  # per-sample shape as in the ONNX graph, without the batch axis
    onnx_input_shape: tuple  # the full declared shape of the ONNX input (may have a fixed batch of 1)
    metadata: dict[str, str]  # the model's metadata_props
    opset: int


def import_onnx(path: str | os.PathLike, *, check: bool = True) -> ImportedModel:
    """Load an ONNX classifier as an eval-mode float32 module taking (N, *input_shape).

    With `check`, the module is compared with onnxruntime on random inputs in [0, 1] before it
    is returned (UserError on any mismatch).

    Every problem of the file is a UserError: reading and validating it (protobuf, the ONNX
    checker, shape inference, tensor sizes, external data, metadata) turns whatever those
    libraries raise into one; converting a node that certify does not handle names the node.
    """
    path = Path(path)
    model = _load_valid_model(path)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    _refuse_unsupported_nodes(graph)

    initializer_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise UserError(
            f"{path} has {len(inputs)} inputs and {len(graph.output)} outputs",
            "certify needs a classifier with one input tensor and one output tensor of logits",
        )
    onnx_input_shape, input_shape, offset = _input_shape(path, inputs[0])
    _check_output_type(path, graph.output[0])
    metadata = _metadata(path, model, input_shape)

    builder = _GraphBuilder(graph)
    for tensor in graph.initializer:
        builder.values[tensor.name] = _Value(_tensor_to_torch(tensor, f"initializer {tensor.name!r}"))
    example = torch.rand((_EXAMPLE_BATCH, *input_shape), generator=torch.Generator().manual_seed(0))
    builder.values[inputs[0].name] = _Value(example, builder.graph.placeholder("x"), offset)
    for index, node in enumerate(graph.node):
        if not node.output or node.output[0] not in builder.fused:
            builder.convert(node, index)
    builder.set_output(graph.output[0].name)

    module = fx.GraphModule(builder.root, builder.graph, class_name="ImportedOnnx").float().eval()
    imported = ImportedModel(
        module=module,
        input_shape=input_shape,
        onnx_input_shape=onnx_input_shape,
        metadata=metadata,
        opset=opset,
    )
    if check:
        probe = torch.rand((3, *input_shape), generator=torch.Generator().manual_seed(1))
        try:
            check_against_onnxruntime(path, module, probe)
        except UserError as error:
            raise UserError(error.what, "certify converts a form of an op in this graph wrongly; "
                            "please report the model (import_onnx(..., check=False) skips this check)"
                            ) from error
    return imported


# ---------------------------------------------------------------------------------------------
# Reading and validating the file


# The largest tensor a graph may declare, in elements (at its declared batch size; a symbolic axis
# counts as 1). The import runs every op on an example batch and the onnxruntime check runs the
# declared batch, so a graph that declares terabytes (a fixed batch of 2**31) is refused before
# anything is allocated. 2**27 float32 values are 512 MiB: far above any classifier certify can bound.
_MAX_ELEMENTS = 1 << 27

# Initializer data types the importer turns into tensors, with the TensorProto field that holds
# them when they are not in raw_data (FLOAT16 is stored as bit patterns in int32_data).
_TENSOR_FIELDS = {
    onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.FLOAT16: "int32_data", onnx.TensorProto.INT64: "int64_data",
    onnx.TensorProto.INT32: "int32_data", onnx.TensorProto.INT16: "int32_data",
    onnx.TensorProto.INT8: "int32_data", onnx.TensorProto.UINT16: "int32_data",
    onnx.TensorProto.UINT8: "int32_data", onnx.TensorProto.BOOL: "int32_data",
    onnx.TensorProto.UINT32: "uint64_data", onnx.TensorProto.UINT64: "uint64_data",
}
_READ_HINT = "pass an .onnx file written by an ONNX exporter (e.g. harden export or torch.onnx.export)"


def _unreadable(path: Path, reason: str) -> UserError:
    return UserError(f"{path} is not a readable ONNX model ({reason})", _READ_HINT)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _load_valid_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read, check and shape-infer the file. Every failure of this phase is a UserError: the
    bytes come from the user, and protobuf, onnx and numpy raise many kinds of errors on them."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UserError(f"{path} does not exist or is not a file", _READ_HINT)
        if path.stat().st_size == 0:
            raise _unreadable(path, "the file is empty")
    except (OSError, ValueError) as error:  # a name too long, a NUL byte, a permission error
        raise UserError(f"cannot read {path} ({_first_line(error)})", "check the path") from None
    try:
        # External data is never resolved by onnx: _inline_external_data checks where it points first.
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf DecodeError, RuntimeError, MemoryError of a huge length, ...
        raise _unreadable(path, _first_line(error)) from None
    try:
        _check_text(path, model)
        _check_tensors(path, model.graph)
        _inline_external_data(path, model)
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        _check_declared_sizes(path, model.graph)
    except UserError:
        raise
    except Exception as error:  # checker and inference errors (ValidationError, InferenceError, ...)
        raise _unreadable(path, _first_line(error)) from None
    if not model.graph.node:
        raise _unreadable(path, "its graph is empty")
    return model


def _check_text(path: Path, model: onnx.ModelProto) -> None:
    """Every name must be text. protobuf hands out bytes for a string field that is not UTF-8."""
    def names():
        graph = model.graph
        yield "graph name", graph.name
        for info in (*graph.input, *graph.output, *graph.value_info):
            yield "value name", info.name
            if info.type.HasField("tensor_type"):
                for dim in info.type.tensor_type.shape.dim:
                    yield "dimension name", dim.dim_param
                    yield "dimension denotation", dim.denotation
        for tensor in graph.initializer:
            yield "initializer name", tensor.name
        for node in graph.node:
            yield "node name", node.name
            yield "op type", node.op_type
            yield "op domain", node.domain
            for name in (*node.input, *node.output):
                yield "value name", name
            for attribute in node.attribute:
                yield "attribute name", attribute.name
        for opset in model.opset_import:
            yield "opset domain", opset.domain

    for what, text in names():
        if not isinstance(text, str):
            raise _unreadable(path, f"a {what} is not UTF-8 text: {bytes(text)[:40]!r}")


def _metadata(path: Path, model: onnx.ModelProto, input_shape: tuple[int, ...]) -> dict[str, str]:
    """The metadata_props as text; harden's own keys must be valid (certify and harden read them)."""
    metadata: dict[str, str] = {}
    for prop in model.metadata_props:
        key, value = prop.key, prop.value
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        if isinstance(value, bytes):
            if key.startswith("harden."):
                raise UserError(f"{path}: the metadata {key!r} is not UTF-8 text",
                                "re-export the model (harden export writes it), or remove that metadata entry")
            value = value.decode("utf-8", "replace")
        metadata[key] = value
    if "harden.data" in metadata:
        data = parse_harden_data(metadata["harden.data"], f"{path}: the metadata 'harden.data'")
        declared = data.get("input_shape")
        if declared is not None and math.prod(declared) != math.prod(input_shape):
            raise UserError(f"{path}: the metadata 'harden.data' says input shape {declared}, the graph "
                            f"takes {list(input_shape)}", "re-export the model; its metadata is damaged")
    return metadata


def _graph_tensors(graph: onnx.GraphProto):
    """(tensor, description) for every TensorProto of the graph and its subgraphs (iteratively)."""
    stack = [graph]
    while stack:
        current = stack.pop()
        for tensor in current.initializer:
            yield tensor, f"initializer {tensor.name!r}"
        for index, node in enumerate(current.node):
            for attribute in node.attribute:
                where = f"attribute {attribute.name!r} of node {_node_label(node, index)}"
                if attribute.HasField("t"):
                    yield attribute.t, where
                for tensor in attribute.tensors:
                    yield tensor, where
                if attribute.HasField("g"):
                    stack.append(attribute.g)
                stack.extend(attribute.graphs)


def _check_tensors(path: Path, graph: onnx.GraphProto) -> None:
    """Every tensor holds exactly the data its dims and type call for, before any is converted."""
    if len(graph.sparse_initializer):
        raise UserError(f"{path} has sparse initializers, which certify does not import",
                        "export the model with dense weights")
    for tensor, what in _graph_tensors(graph):
        dims = list(tensor.dims)
        if any(d < 0 for d in dims):
            raise _unreadable(path, f"{what} has negative dims {dims}")
        if tensor.HasField("segment"):
            raise _unreadable(path, f"{what} is a segment of a tensor, which certify does not import")
        field = _TENSOR_FIELDS.get(tensor.data_type)
        if field is None:
            name = onnx.TensorProto.DataType.Name(tensor.data_type) \
                if tensor.data_type in onnx.TensorProto.DataType.values() else str(tensor.data_type)
            raise UserError(f"{path}: {what} has data type {name}, which certify does not import",
                            "certify imports float and integer tensors only")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # checked against its file in _inline_external_data
        count = math.prod(dims)
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        if tensor.HasField("raw_data"):
            if len(tensor.raw_data) != count * itemsize:
                raise _unreadable(path, f"{what} holds {len(tensor.raw_data)} bytes, but its dims {dims} "
                                        f"call for {count * itemsize}")
        else:
            stored = len(getattr(tensor, field))
            if stored != count:
                raise _unreadable(path, f"{what} holds {stored} values, but its dims {dims} call for {count}")


def _inline_external_data(path: Path, model: onnx.ModelProto) -> None:
    """Read tensors stored in separate files into the model, after checking where they point.

    A location must be a relative path inside the model's folder: absolute paths, `..` and
    symbolic links that lead out of the folder are refused without being read (a model file must
    not be able to make certify read, and report the sha256 or parts of, any file on the machine).
    """
    folder = os.path.realpath(path.parent)
    for tensor, what in _graph_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {}
        for entry in tensor.external_data:
            if not isinstance(entry.key, str) or not isinstance(entry.value, str):
                raise _unreadable(path, f"the external data entry of {what} is not UTF-8 text")
            info[entry.key] = entry.value
        location = info.get("location", "")
        refuse = f"{path}: {what} is stored in {location!r}"
        hint = "keep external data files in the model's folder (or save the model without external data)"
        if not location or "\0" in location:
            raise _unreadable(path, f"{what} is stored externally, but names no file")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ".." in Path(location).parts \
                or ".." in location.split("\\"):
            raise UserError(f"{refuse}, outside the model's folder; certify does not read it", hint)
        target = os.path.realpath(os.path.join(folder, location))
        if os.path.commonpath([folder, target]) != folder:
            raise UserError(f"{refuse}, a link that leads outside the model's folder; certify does not read it",
                            hint)
        if not os.path.isfile(target):
            raise UserError(f"{refuse}, which does not exist next to the model", hint)
        try:
            offset = int(info.get("offset", "0"))
            size = os.path.getsize(target)
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            raise _unreadable(path, f"{what} has a bad external offset or length") from None
        expected = math.prod(tensor.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        if offset < 0 or length < 0 or offset + length > size:
            raise UserError(f"{refuse}, which holds {size} bytes, fewer than offset {offset} + length {length}",
                            "the data file is truncated or belongs to another model")
        if length != expected:
            raise _unreadable(path, f"{what} stores {length} bytes externally, but its dims call for {expected}")
        with open(target, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        if len(data) != length:
            raise UserError(f"{refuse}, which is shorter than it says", "the data file is truncated")
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _check_declared_sizes(path: Path, graph: onnx.GraphProto) -> None:
    for kind, infos in (("input", graph.input), ("value", graph.value_info), ("output", graph.output)):
        for info in infos:
            if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
            if any(d is not None and d < 0 for d in dims):
                raise _unreadable(path, f"{kind} {info.name!r} has negative dims {dims}")
            count = math.prod(d for d in dims if d is not None)
            if count > _MAX_ELEMENTS:
                shown = ["N" if d is None else d for d in dims]
                batch = dims[0] if dims else None
                hint = "export the model with batch size 1 or a dynamic batch axis" \
                    if batch is not None and batch > 1 and count // batch <= _MAX_ELEMENTS \
                    else "certify bounds smaller models"
                raise UserError(f"{path}: {kind} {info.name!r} has shape {shown}, {count:,} values; certify "
                                f"imports graphs whose tensors hold at most {_MAX_ELEMENTS:,}", hint)


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.name!r}" if node.name else f"#{index} (output {node.output[0]!r})"


def _refuse_unsupported_nodes(graph: onnx.GraphProto) -> None:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    supported = ", ".join(sorted(SUPPORTED_OPS))
    for index, node in enumerate(graph.node):
        if node.op_type == "Softmax" and _only_reshaped_to_output(node, consumers, outputs):
            raise UserError(
                f"the model ends in a Softmax (node {_node_label(node, index)}): certify bounds logits, "
                "not probabilities",
                "export the model without its final Softmax so that it outputs logits",
            )
        if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
            op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
            raise UserError(f"unsupported ONNX op {op} at node {_node_label(node, index)}",
                            f"certify imports these ops only: {supported}")


def _only_reshaped_to_output(node, consumers, outputs) -> bool:
    frontier = list(node.output)
    while frontier:
        name = frontier.pop()
        if name in outputs:
            return True
        for user in consumers.get(name, []):
            if user.op_type in _SHAPE_ONLY_OPS:
                frontier.extend(user.output)
    return False


def _input_shape(path, value_info: onnx.ValueInfoProto) -> tuple[tuple, tuple[int, ...], int]:
    tensor_type = value_info.type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UserError(f"the input {value_info.name!r} of {path} is not float32",
                        "export the model with a float32 input")
    if not tensor_type.HasField("shape") or not tensor_type.shape.dim:
        raise UserError(f"the input {value_info.name!r} of {path} has no declared shape",
                        "export the model with a fixed per-sample input shape")
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in tensor_type.shape.dim)
    # A rank-1 input of fixed size ([5]) is one sample without a batch axis; otherwise axis 0 is
    # the batch, fixed (often to 1) or symbolic.
    offset = 1 if len(dims) == 1 and isinstance(dims[0], int) else 0
    per_sample = dims[1 - offset:]
    if offset == 0 and dims[0] == 0:
        raise UserError(f"the input {value_info.name!r} of {path} has a batch axis of size 0",
                        "export the model with batch size 1 or a dynamic batch axis")
    if not all(isinstance(d, int) and d > 0 for d in per_sample):
        raise UserError(f"the input {value_info.name!r} of {path} has shape {list(dims)} with a "
                        "non-fixed axis besides the batch axis",
                        "export the model with a fixed per-sample input shape")
    return dims, tuple(per_sample), offset


def _check_output_type(path, value_info: onnx.ValueInfoProto) -> None:
    tensor_type = value_info.type.tensor_type
    if value_info.type.HasField("tensor_type") and tensor_type.elem_type not in (
            onnx.TensorProto.UNDEFINED, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
        name = onnx.TensorProto.DataType.Name(tensor_type.elem_type) \
            if tensor_type.elem_type in onnx.TensorProto.DataType.values() else str(tensor_type.elem_type)
        raise UserError(f"the output {value_info.name!r} of {path} has type {name}, not float logits",
                        "export the model so that it outputs one float logit per class")


def _tensor_to_torch(tensor: onnx.TensorProto, what: str) -> torch.Tensor:
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as error:  # a data type or layout numpy_helper cannot read
        raise UserError(f"the model's {what} cannot be read ({_first_line(error)})",
                        "certify imports float and integer tensors only") from None
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise UserError(f"the model's {what} contains NaN or infinite values",
                            "fix or retrain the model; certify only bounds finite weights")
        return torch.from_numpy(np.array(array, dtype=np.float32))
    if array.dtype.kind in "iu":
        return torch.from_numpy(np.array(array, dtype=np.int64))
    if array.dtype.kind == "b":
        return torch.from_numpy(np.array(array))
    raise UserError(f"the model's {what} has an unsupported data type {array.dtype}",
                    "certify imports float and integer tensors only")


# ---------------------------------------------------------------------------------------------
# Building the torch.fx graph


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
    def __init__(self, graph: onnx.GraphProto):
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
            result = _CONVERTERS[node.op_type](self, node, attrs, *inputs)
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


# ---------------------------------------------------------------------------------------------
# One converter per ONNX op: (builder, node, attributes, *input values) -> value(s)


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


_CONVERTERS: dict[str, Callable] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "Relu": _activation(lambda attrs: nn.ReLU()),
    "Sigmoid": _activation(lambda attrs: nn.Sigmoid()),
    "Tanh": _activation(lambda attrs: nn.Tanh()),
    "LeakyRelu": _activation(lambda attrs: nn.LeakyReLU(float(attrs.get("alpha", 0.01)))),
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
assert set(_CONVERTERS) == SUPPORTED_OPS
