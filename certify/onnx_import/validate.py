"""Reading and validating an ONNX file: protobuf, the checker and shape inference, tensor sizes,
external data, metadata, the input and output types. Every failure is a UserError."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from certify.common.errors import UserError
from certify.onnx_import.metadata import parse_harden_data

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
