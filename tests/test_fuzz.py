"""Fuzzing the two readers of untrusted text and bytes: the VNN-LIB parser and the ONNX loader.

Whatever a mutated file holds, the only exception that may escape is our UserError (which the
command lines print as one line). Anything else is a crash a user would see as a traceback.
Each property is bounded in examples and has no deadline, so the module stays within a minute.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds.compat import lirpa
from certify.common.errors import UserError
from certify.onnx_import.reader import import_onnx
from certify.specs.vnnlib import parse_vnnlib

# A complete robustness property of the usual VNN-COMP shape: 4 inputs, 3 outputs, an OR of ANDs.
SEED_PROPERTY = """; a small robustness property
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const X_2 Real)
(declare-const X_3 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (<= X_0 0.6))
(assert (>= X_0 0.5))
(assert (and (<= X_1 0.25) (>= X_1 -0.25)))
(assert (<= X_2 1e-1))
(assert (>= X_2 -1e-1))
(assert (<= X_3 0.0))
(assert (>= X_3 0.0))
(assert (or (and (>= Y_1 Y_0) (<= Y_2 3.5)) (and (>= Y_2 Y_0)) (and (<= (- Y_0 Y_1) 0))))
"""

VNNLIB_TOKENS = ["(", ")", "(", ")", "assert", "and", "or", "<=", ">=", "declare-const", "Real", "X_0", "X_3",
                 "X_9", "Y_0", "Y_2", "Y_-1", "0.5", "-1e999", "1e309", "nan", "inf", "+", "-", "*", ";", "\n", " ",
                 "\x00", "\udcff", "é", "((((((((", "))))"]

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _parse_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prop.vnnlib"
        path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
        try:
            prop = parse_vnnlib(path)
        except UserError:
            return
        # What the parser accepts must be a usable property: a finite box, lower <= upper.
        assert torch.isfinite(prop.lower).all() and torch.isfinite(prop.upper).all()
        assert (prop.lower <= prop.upper).all()
        for C, d in prop.unsafe:
            assert torch.isfinite(C).all() and torch.isfinite(d).all()


@settings(max_examples=400, **SETTINGS)
@given(st.data())
def test_mutated_vnnlib_text_raises_only_user_errors(data):
    text = SEED_PROPERTY
    for _ in range(data.draw(st.integers(1, 6), label="edits")):
        where = data.draw(st.integers(0, len(text)), label="where")
        kind = data.draw(st.sampled_from(["insert", "delete", "replace", "truncate", "duplicate"]), label="kind")
        if kind == "insert":
            text = text[:where] + data.draw(st.sampled_from(VNNLIB_TOKENS)) + text[where:]
        elif kind == "delete":
            text = text[:where] + text[where + data.draw(st.integers(1, 12)):]
        elif kind == "replace":
            text = text[:where] + data.draw(st.text(max_size=8)) + text[where + 1:]
        elif kind == "truncate":
            text = text[:where]
        else:
            text = text[:where] + text[where:where + 40] + text[where:]
    _parse_text(text)


@settings(max_examples=60, **SETTINGS)
@given(depth=st.integers(1, 200_000), kind=st.sampled_from(["and", "or", "paren"]))
def test_deeply_nested_vnnlib_raises_only_user_errors(depth, kind):
    lirpa()  # auto_LiRPA raises the recursion limit to 1e6: a recursive reader would overflow the C stack
    head = {"and": "(and ", "or": "(or ", "paren": "("}[kind]
    _parse_text(SEED_PROPERTY + "(assert " + head * depth + "(>= Y_0 Y_1)" + ")" * depth + ")\n")


@settings(max_examples=30, **SETTINGS)
@given(clauses=st.integers(2, 40), width=st.integers(2, 40))
def test_products_of_disjunctions_raise_only_user_errors(clauses, width):
    # An AND of ORs expands to width**clauses disjuncts: it must be refused, not built.
    disjunction = "(or " + " ".join(f"(>= Y_{k % 3} {k / 10})" for k in range(width)) + ")"
    _parse_text(SEED_PROPERTY + "(assert (and " + " ".join([disjunction] * clauses) + "))\n")


class _SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def seed_onnx() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(_SmallNet().eval(), torch.zeros(1, 1, 8, 8), buffer, dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, {"harden.data": '{"dataset": "mnist"}'})
    return model.SerializeToString()


def _import_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(raw)
        try:
            imported = import_onnx(path)
        except UserError:
            return
        out = imported.module(torch.rand(2, *imported.input_shape))
        assert out.shape[0] == 2


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_mutated_onnx_bytes_raise_only_user_errors(seed_onnx, data):
    raw = bytearray(seed_onnx)
    for _ in range(data.draw(st.integers(1, 8), label="edits")):
        where = data.draw(st.integers(0, len(raw) - 1), label="where")
        kind = data.draw(st.sampled_from(["flip", "byte", "delete", "insert", "truncate"]), label="kind")
        if kind == "flip":
            raw[where] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte":
            raw[where] = data.draw(st.integers(0, 255))
        elif kind == "delete":
            del raw[where:where + data.draw(st.integers(1, 16))]
        elif kind == "insert":
            raw[where:where] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del raw[max(where, 1):]
        if not raw:
            raw = bytearray(b"\x00")
    _import_bytes(bytes(raw))


def _mutate_structure(model: onnx.ModelProto, data) -> None:
    graph = model.graph
    kind = data.draw(st.sampled_from(["dims", "op", "drop-node", "attribute", "input-shape", "metadata",
                                      "raw-data", "dtype", "rename-edge", "external-data"]), label="structure")
    if kind == "dims":
        tensor = data.draw(st.sampled_from(list(graph.initializer)))
        if tensor.dims:
            tensor.dims[data.draw(st.integers(0, len(tensor.dims) - 1))] = data.draw(
                st.sampled_from([0, 1, 3, -1, 2**31, 2**62]))
    elif kind == "op":
        node = data.draw(st.sampled_from(list(graph.node)))
        node.op_type = data.draw(st.sampled_from(["Relu", "Conv", "Gemm", "Softmax", "Loop", "Foo", "", "MatMul"]))
    elif kind == "drop-node":
        del graph.node[data.draw(st.integers(0, len(graph.node) - 1))]
    elif kind == "attribute":
        node = data.draw(st.sampled_from([n for n in graph.node if n.attribute] or list(graph.node)))
        for attribute in node.attribute:
            if attribute.ints:
                attribute.ints[0] = data.draw(st.sampled_from([0, -1, 7, 2**40]))
            attribute.i = data.draw(st.sampled_from([0, -3, 2**40]))
    elif kind == "input-shape":
        dims = graph.input[0].type.tensor_type.shape.dim
        index = data.draw(st.integers(0, len(dims) - 1))
        dims[index].dim_value = data.draw(st.sampled_from([0, 2, 2**31, 2**40]))
    elif kind == "metadata":
        value = data.draw(st.sampled_from(['{"dataset": 3}', "{bad json", "[1, 2]", '"mnist"', "\udcff", "null",
                                           '{"mean": "x", "std": [0]}', '{"input_range": [1, 0]}']))
        del model.metadata_props[:]
        model.metadata_props.add(key="harden.data", value=value.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    elif kind == "raw-data":
        tensor = data.draw(st.sampled_from(list(graph.initializer)))
        raw = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
        tensor.ClearField("float_data")
        tensor.raw_data = raw[: data.draw(st.integers(0, len(raw)))]
    elif kind == "dtype":
        tensor = data.draw(st.sampled_from(list(graph.initializer)))
        tensor.data_type = data.draw(st.sampled_from([onnx.TensorProto.STRING, onnx.TensorProto.INT8,
                                                      onnx.TensorProto.DOUBLE, onnx.TensorProto.BOOL, 0, 99]))
    elif kind == "rename-edge":
        node = data.draw(st.sampled_from(list(graph.node)))
        node.input[0] = data.draw(st.sampled_from(["missing", node.output[0], ""]))
    else:  # external data that points outside the model's folder must never be read
        tensor = data.draw(st.sampled_from(list(graph.initializer)))
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=data.draw(st.sampled_from(
            ["/etc/passwd", "../../outside.bin", "missing.bin", "", "/dev/zero"])))


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_mutated_onnx_structures_raise_only_user_errors(seed_onnx, data):
    model = onnx.load_from_string(seed_onnx)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        _mutate_structure(model, data)
    _import_bytes(model.SerializeToString())
