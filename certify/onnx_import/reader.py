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

The import reads in order: `validate` (the file: protobuf, tensors, external data, metadata),
`graph_builder` (values and the fx graph), `converters` (one converter per op in the table
CONVERTERS; SUPPORTED_OPS is its keys); this module screens the nodes and runs them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx
import torch
import torch.fx as fx

from certify.common.errors import UserError
from certify.onnx_import.converters import CONVERTERS, SUPPORTED_OPS
from certify.onnx_import.graph_builder import _EXAMPLE_BATCH, _GraphBuilder, _Value
from certify.onnx_import.parity import check_against_onnxruntime
from certify.onnx_import.validate import (
    _check_output_type,
    _input_shape,
    _load_valid_model,
    _metadata,
    _node_label,
    _tensor_to_torch,
)

__all__ = ["ImportedModel", "SUPPORTED_OPS", "import_onnx"]

# Ops that only move values around: a Softmax followed by these still ends the model.
_SHAPE_ONLY_OPS = frozenset({"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze"})


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

    builder = _GraphBuilder(graph, CONVERTERS)
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
