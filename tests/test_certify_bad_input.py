"""Every failure a user can cause in `certify` is ONE line `error: what -- hint`, exit code 2, and
leaves nothing behind: no report, no plot, no counterexample, no .partial file, and every input
(the model above all) byte for byte as it was.

Each case runs the real command line (typer's CliRunner, in process) in a folder of its own that
holds a small real ONNX classifier (torch.onnx.export), an .npz dataset, a VNN-LIB property and an
instances.csv; the case then damages one of them or passes one bad option. A few checks run
`python -m certify` as a subprocess, where warnings and onnxruntime's own logging would show.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from certify.cli import app
from certify.common.errors import UserError
from certify.onnx_import.reader import import_onnx
from certify.specs.vnnlib import parse_vnnlib

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 4, 4)  # per-sample input of the test classifier
INPUTS = 16
CLASSES = 3


# ---------------------------------------------------------------------------------------------
# The kit: a real classifier, its data, a property and an instances.csv


def _vnnlib_text(inputs: int = INPUTS, outputs: int = CLASSES, low: float = 0.1, high: float = 0.2) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(inputs)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(outputs)]
    for i in range(inputs):
        lines += [f"(assert (>= X_{i} {low}))", f"(assert (<= X_{i} {high}))"]
    lines.append("(assert (or " + " ".join(f"(>= Y_{j} Y_0)" for j in range(1, outputs)) + "))")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kit")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(INPUTS, 8), nn.ReLU(), nn.Linear(8, CLASSES)).eval()
    torch.onnx.export(model, torch.zeros(1, *SHAPE), str(folder / "m.onnx"), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    x = np.random.default_rng(0).random((20, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(folder / "d.npz", x=x, y=y, classes=np.array(["a", "b", "c"]))
    (folder / "p.vnnlib").write_text(_vnnlib_text())
    (folder / "instances.csv").write_text("m.onnx,p.vnnlib,60\n")
    (folder / "afile").write_text("a regular file, standing where a folder would have to be\n")
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder`: files by sha256, links by target, folders as such."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            relative = str(path.relative_to(folder))
            if path.is_symlink():
                entries[relative] = "link:" + os.readlink(path)
            elif path.is_dir():
                entries[relative] = "dir"
            elif not path.is_file():
                entries[relative] = "special"  # a FIFO: reading it would block
            else:
                entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def _assert_one_line_error(result, expected: str) -> str:
    output = result.output
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert result.exit_code == 2, (result.exit_code, output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert expected in lines[0], (expected, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Hand-built ONNX files: each damaged in one way


def _save(path: Path, nodes, inputs, outputs, initializers=(), *, metadata=None, opset: int = 17) -> None:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())  # no checker: these files are meant to be broken


def _weight(classes: int = CLASSES, name: str = "w") -> onnx.TensorProto:
    values = np.random.default_rng(1).normal(size=(classes, INPUTS)).astype(np.float32)
    return numpy_helper.from_array(values, name)


def _classifier(path: Path, *, classes: int = CLASSES, batch="N", weight: onnx.TensorProto | None = None,
                input_type=TensorProto.FLOAT, metadata=None, extra_nodes=(), output_shape=None,
                output_name: str = "y") -> None:
    """x [batch, 1, 4, 4] -> Flatten -> Relu -> Gemm(w) -> y [batch, classes] (plus `extra_nodes`)."""
    nodes = [helper.make_node("Flatten", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["logits" if extra_nodes else output_name], transB=1),
             *extra_nodes]
    _save(path, nodes, [helper.make_tensor_value_info("x", input_type, [batch, *SHAPE])],
          [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, output_shape or [batch, classes])],
          [weight if weight is not None else _weight(classes)], metadata=metadata)


def _external(path: Path, location: str, data_file: Path | None) -> None:
    """The classifier with its weight stored outside the .onnx file, at `location`."""
    weight = _weight()
    raw = weight.raw_data
    if data_file is not None:
        data_file.write_bytes(raw)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    _classifier(path, weight=weight)


def _metadata(**data) -> dict[str, str]:
    import json

    return {"harden.data": json.dumps({"dataset": "d.npz", "input_range": [0.0, 1.0], **data})}


def _model_case(build, expected: str, *extra: str):
    """A case that writes a damaged m.onnx and certifies it on the kit's data."""
    def case(d: Path) -> list[str]:
        build(d)
        return ["m.onnx", "--data", "d.npz", "--eps", "0.1", "--json", "r.json", *extra]
    return case, expected


def _mutated_bytes(d: Path, how) -> None:
    data = bytearray((d / "m.onnx").read_bytes())
    (d / "m.onnx").write_bytes(how(data))


def _replace_in_file(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))


def _non_utf8_metadata(d: Path) -> None:
    _classifier(d / "m.onnx", metadata=_metadata(note="ABCDEF"))
    _replace_in_file(d / "m.onnx", b"ABCDEF", b"\xff\xfe\xfdDEF")


def _short_raw_data(d: Path) -> None:
    weight = _weight()
    weight.raw_data = weight.raw_data[:-4]
    _classifier(d / "m.onnx", weight=weight)


def _wrong_float_data(d: Path) -> None:
    weight = _weight()
    values = np.frombuffer(weight.raw_data, np.float32)
    weight.ClearField("raw_data")
    weight.float_data.extend(values.tolist() + [1.0])
    _classifier(d / "m.onnx", weight=weight)


def _huge_dims(d: Path) -> None:
    weight = _weight()
    del weight.dims[:]
    weight.dims.extend([CLASSES, 2 ** 40])
    _classifier(d / "m.onnx", weight=weight)


def _nan_weight(d: Path) -> None:
    values = np.ones((CLASSES, INPUTS), np.float32)
    values[1, 2] = np.nan
    _classifier(d / "m.onnx", weight=numpy_helper.from_array(values, "w"))


def _symlink_out(d: Path) -> None:
    outside = d.parent / "outside.bin"
    outside.write_bytes(_weight().raw_data)
    os.symlink(outside, d / "weights.bin")
    _external(d / "m.onnx", "weights.bin", None)


def _plain(nodes, inputs, outputs, initializers=()):
    return lambda d: _save(d / "m.onnx", nodes, inputs, outputs, initializers)


_X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])
_Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])
_FLAT_GEMM = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]

MODEL_CASES = {
    "truncated": _model_case(lambda d: _mutated_bytes(d, lambda b: b[: len(b) // 2]), "is not a readable ONNX model"),
    "random-bytes": _model_case(lambda d: (d / "m.onnx").write_bytes(np.random.default_rng(0).integers(
        0, 256, 4096, dtype=np.uint8).tobytes()), "is not a readable ONNX model"),
    "empty-file": _model_case(lambda d: (d / "m.onnx").write_bytes(b""), "the file is empty"),
    "text-file": _model_case(lambda d: (d / "m.onnx").write_text("not a model\n"), "is not a readable ONNX model"),
    "damaged-metadata-json": _model_case(
        lambda d: _classifier(d / "m.onnx", metadata={"harden.data": '{"dataset": "mnist", '}),
        "'harden.data' is not valid JSON"),
    "metadata-not-an-object": _model_case(
        lambda d: _classifier(d / "m.onnx", metadata={"harden.data": "[1, 2]"}), "is not a JSON object"),
    "metadata-std-zero": _model_case(lambda d: _classifier(d / "m.onnx", metadata=_metadata(std=[0.0])),
                                     "std [0.0] is not a list of positive"),
    "metadata-mean-nan": _model_case(
        lambda d: _classifier(d / "m.onnx", metadata={"harden.data": '{"mean": [NaN]}'}), "mean [NaN] is not a list of finite numbers"),
    "metadata-range-reversed": _model_case(
        lambda d: _classifier(d / "m.onnx", metadata=_metadata(input_range=[1.0, 0.0])), "input_range [1.0, 0.0] is not [low, high]"),
    "metadata-input-shape": _model_case(
        lambda d: _classifier(d / "m.onnx", metadata=_metadata(input_shape=[3, 32, 32])), "says input shape [3, 32, 32]"),
    "metadata-class-count": _model_case(
        lambda d: _classifier(d / "m.onnx", metadata=_metadata(classes=["a", "b", "c", "d", "e"])),
        "its metadata names 5 classes"),
    "metadata-non-utf8": _model_case(_non_utf8_metadata, "is not UTF-8 text"),
    "raw-data-short": _model_case(_short_raw_data, "holds 188 bytes, but its dims [3, 16] call for 192"),
    "float-data-count": _model_case(_wrong_float_data, "holds 49 values, but its dims [3, 16] call for 48"),
    "dims-huge": _model_case(_huge_dims, "call for 13194139533312"),
    "fixed-batch-2**31": _model_case(lambda d: _classifier(d / "m.onnx", batch=2 ** 31),
                                     "has shape [2147483648, 1, 4, 4]"),
    "external-absolute": _model_case(lambda d: _external(d / "m.onnx", str(d.parent / "abs.bin"), d.parent / "abs.bin"),
                                     "outside the model's folder"),
    "external-dotdot": _model_case(lambda d: _external(d / "m.onnx", "../up.bin", d.parent / "up.bin"),
                                   "outside the model's folder"),
    "external-symlink-out": _model_case(_symlink_out, "a link that leads outside the model's folder"),
    "external-missing": _model_case(lambda d: _external(d / "m.onnx", "gone.bin", None), "which does not exist"),
    "unsupported-op": _model_case(_plain([helper.make_node("Softsign", ["x"], ["e"], name="my_softsign"),
                                          helper.make_node("Flatten", ["e"], ["f"]),
                                          helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)],
                                         [_X], [_Y], [_weight()]), "unsupported ONNX op Softsign at node 'my_softsign'"),
    "custom-domain-op": _model_case(_plain([helper.make_node("Relu", ["x"], ["r"], domain="com.example"),
                                            helper.make_node("Flatten", ["r"], ["f"]),
                                            helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)],
                                           [_X], [_Y], [_weight()]), "is not a readable ONNX model"),
    "missing-input": _model_case(_plain([helper.make_node("Flatten", ["nowhere"], ["f"]),
                                         helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)],
                                        [_X], [_Y], [_weight()]), "is not a readable ONNX model"),
    "cycle": _model_case(_plain([helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                                 helper.make_node("Flatten", ["b"], ["f"]),
                                 helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)],
                                [_X], [_Y], [_weight()]), "is not a readable ONNX model"),
    "empty-graph": _model_case(_plain([], [_X], [_X]), "its graph is empty"),
    "zero-outputs": _model_case(_plain(_FLAT_GEMM, [_X], [], [_weight()]), "0 outputs"),
    "two-inputs": _model_case(_plain([helper.make_node("Add", ["x", "x2"], ["s"]), helper.make_node("Flatten", ["s"], ["f"]),
                                      helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)],
                                     [_X, helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", *SHAPE])],
                                     [_Y], [_weight()]), "has 2 inputs and 1 outputs"),
    "int64-input": _model_case(lambda d: _classifier(d / "m.onnx", input_type=TensorProto.INT64),
                               "is not a readable ONNX model"),
    "bad-attribute": _model_case(_plain([helper.make_node("Flatten", ["x"], ["f"], axis=9),
                                         helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)], [_X], [_Y], [_weight()]),
                                 "is not a readable ONNX model"),
    "nan-weight": _model_case(_nan_weight, "contains NaN or infinite values"),
    "softmax-output": _model_case(lambda d: _classifier(d / "m.onnx", extra_nodes=[
        helper.make_node("Softmax", ["logits"], ["y"], axis=1)]), "ends in a Softmax"),
    "output-(batch,1)": _model_case(lambda d: _classifier(d / "m.onnx", classes=1),
                                    "returns 1 value(s) per sample; a classifier needs one logit per class"),
    "output-(batch,)": _model_case(lambda d: _save(d / "m.onnx", [
        helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["g"], transB=1),
        helper.make_node("Reshape", ["g", "s"], ["y"])], [_X], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [_weight(1), numpy_helper.from_array(np.array([-1], np.int64), "s")]), "returns 1 value(s) per sample"),
    "100-outputs-on-3-classes": _model_case(lambda d: _classifier(d / "m.onnx", classes=100),
                                            "m.onnx has 100 outputs, but d.npz has 3 classes"),
    "labels-beyond-the-classes": _model_case(
        lambda d: np.savez(d / "d.npz", x=np.random.default_rng(0).random((6, *SHAPE)).astype(np.float32),
                           y=np.array([0, 1, 2, 3, 4, 5])), "the data has label 5, but m.onnx has 3 outputs"),
    "outputs-infinite": _model_case(_plain([*_FLAT_GEMM[:1], helper.make_node("Gemm", ["f", "w"], ["g"], transB=1),
                                            helper.make_node("Div", ["g", "zero"], ["y"])], [_X], [_Y],
                                           [_weight(), numpy_helper.from_array(np.zeros(CLASSES, np.float32), "zero")]),
                                    "computes NaN or infinite outputs"),
    "model-is-a-folder": _model_case(lambda d: ((d / "m.onnx").unlink(), (d / "m.onnx").mkdir()), "is a folder"),
}


def _args_case(args: list[str], expected: str, prepare=None):
    def case(d: Path) -> list[str]:
        if prepare is not None:
            prepare(d)
        return list(args)
    return case, expected


_DATASET = ["m.onnx", "--data", "d.npz", "--eps", "0.1"]
_VNN = ["m.onnx", "--vnnlib", "p.vnnlib"]

OUTPUT_CASES = {
    "json-onto-the-model": _args_case([*_DATASET, "--json", "m.onnx"], "--json m.onnx is also an input"),
    "json-onto-the-data": _args_case([*_DATASET, "--json", "d.npz"], "--json d.npz is also an input"),
    "json-onto-the-vnnlib": _args_case([*_VNN, "--json", "p.vnnlib"], "--json p.vnnlib is also an input"),
    "json-onto-the-csv": _args_case(["--vnnlib", "instances.csv", "--json", "instances.csv"],
                                    "--json instances.csv is also an input"),
    "json-onto-a-folder": _args_case([*_DATASET, "--json", "."], "is a folder"),
    "json-below-a-file": _args_case([*_DATASET, "--json", "afile/r.json"], "its folder cannot be created"),
    "plot-below-a-file": _args_case([*_DATASET, "--plot", "afile/p.png"], "its folder cannot be created"),
    "plot-onto-a-folder": _args_case([*_DATASET, "--plot", "p.png"], "--plot p.png is a folder",
                                     prepare=lambda d: (d / "p.png").mkdir()),
    "plot-wrong-suffix": _args_case([*_DATASET, "--plot", "p.txt"], "cannot write a plot to p.txt"),
    "plot-and-json-same-file": _args_case([*_DATASET, "--json", "out.svg", "--plot", "out.svg"], "both name"),
    "cex-dir-onto-the-model": _args_case([*_VNN, "--cex-dir", "m.onnx"], "--cex-dir m.onnx is a file"),
    "cex-dir-below-a-file": _args_case([*_VNN, "--cex-dir", "afile/cex"], "its folder cannot be created"),
    "json-counterexample-folder-is-a-file": _args_case(
        [*_VNN, "--json", "r.json"], "r.counterexamples is a file",
        prepare=lambda d: (d / "r.counterexamples").write_text("x")),
    "json-onto-a-fifo": _args_case([*_DATASET, "--json", "fifo"], "--json fifo is not a regular file",
                                   prepare=lambda d: os.mkfifo(d / "fifo")),
    "cex-dir-without-vnnlib": _args_case([*_DATASET, "--cex-dir", "cex"], "--cex-dir applies to --vnnlib runs only"),
}

OPTION_CASES = {
    name: _args_case([*_DATASET, *args, "--json", "r.json"], expected) for name, (args, expected) in {
        "mean-nan": (["--mean", "nan"], "--mean nan has a value that is not a finite number"),
        "std-zero": (["--std", "0"], "--std 0 has a value <= 0"),
        "std-negative": (["--std", "-0.3"], "has a value <= 0"),
        "std-nan": (["--std", "nan"], "--std nan has a value that is not a finite number"),
        "mean-not-numbers": (["--mean", "a,b"], "is not a comma-separated list of numbers"),
        "mean-wrong-channels": (["--mean", "0.1,0.2,0.3"], "--mean 0.1,0.2,0.3 gives 3 values, the model's input has 1 channel"),
        "eps-negative": (["--eps", "-0.1"], "eps -0.1 is out of range"),
        "eps-nan": (["--eps", "nan"], "eps nan is out of range"),
        "eps-inf": (["--eps", "inf"], "eps inf is out of range"),
        "eps-above-the-input-range": (["--eps", "1.5"], "eps 1.5 is out of range"),
        "limit-zero": (["--limit", "0"], "--limit 0 is not positive"),
        "limit-negative": (["--limit", "-3"], "--limit -3 is not positive"),
        "batch-size-zero": (["--batch-size", "0"], "--batch-size 0 is not positive"),
        "attack-steps-zero": (["--attack-steps", "0"], "--attack-steps 0 is not positive"),
        "attack-restarts-negative": (["--attack-restarts", "-1"], "--attack-restarts -1 is not positive"),
        "radius-tol-zero": (["--radius", "--radius-tol", "0"], "--radius-tol 0.0 is out of range"),
        "radius-tol-above-max": (["--radius", "--radius-tol", "0.5", "--radius-max", "0.2"], "is not below --radius-max"),
        "radius-max-zero": (["--radius", "--radius-max", "0"], "--radius-max 0.0 is out of range"),
        "radius-max-above-the-range": (["--radius", "--radius-max", "3"], "--radius-max 3.0 is out of range"),
        "radius-max-without-radius": (["--radius-max", "-1"], "--radius-max applies only with --radius"),
        "fail-under-above-one": (["--fail-under", "1.5"], "--fail-under 1.5 is out of range"),
        "fail-under-negative": (["--fail-under", "-0.1"], "--fail-under -0.1 is out of range"),
        "split-unknown": (["--split", "validation"], "unknown --split 'validation'"),
        "method-unknown": (["--method", "beta-crown"], "unknown --method"),
        "device-gpu": (["--device", "gpu"], "--device"),
        "device-tpu": (["--device", "tpu"], "--device"),
        "seed-beyond-64-bits": (["--seed", str(2 ** 70)], "is out of range"),
        "limit-not-a-number": (["--limit", "abc"], "--limit"),
        "unknown-option": (["--bogus"], "No such option: --bogus"),
        "extra-argument": (["other.onnx"], "unexpected extra argument"),
    }.items()
}
if not torch.cuda.is_available():
    OPTION_CASES["device-cuda-without-cuda"] = _args_case([*_DATASET, "--device", "cuda"], "CUDA is not available")


def _vnnlib_case(text: str | bytes, expected: str, *extra: str):
    def case(d: Path) -> list[str]:
        target = d / "p.vnnlib"
        target.write_bytes(text if isinstance(text, bytes) else text.encode())
        return [*_VNN, "--json", "r.json", *extra]
    return case, expected


_DECLARE = "".join(f"(declare-const X_{i} Real)\n" for i in range(INPUTS)) + \
    "".join(f"(declare-const Y_{j} Real)\n" for j in range(CLASSES))
_BOX = "".join(f"(assert (>= X_{i} 0.1))\n(assert (<= X_{i} 0.2))\n" for i in range(INPUTS))
_OR_OF_20 = "(or " + " ".join(f"(>= Y_1 {k})" for k in range(20)) + ")"


def _csv_case(text: str, expected: str):
    def case(d: Path) -> list[str]:
        (d / "instances.csv").write_text(text)
        return ["--vnnlib", "instances.csv", "--json", "r.json"]
    return case, expected


VNNLIB_CASES = {
    "nested-deeper-than-the-stack": _vnnlib_case(_DECLARE + _BOX + "(assert " + "(and " * 20_000 + "(<= Y_0 Y_1)"
                                                 + ")" * 20_001 + "\n", "nested more than 100 levels deep"),
    "coefficient-1e999": _vnnlib_case(_DECLARE + _BOX + "(assert (<= (* 1e999 Y_0) Y_1))\n", "number '1e999' is out of range"),
    "product-overflows": _vnnlib_case(_DECLARE + _BOX + "(assert (<= (* 1e200 1e200 Y_0) Y_1))\n",
                                      "overflows to infinity"),
    "sum-overflows": _vnnlib_case(_DECLARE + _BOX + "(assert (<= (+ 1e308 1e308 Y_0) Y_1))\n", "overflows to infinity"),
    "or-of-ands-blowup": _vnnlib_case(_DECLARE + _BOX + "(assert (and " + " ".join([_OR_OF_20] * 8) + "))\n",
                                      "expands to 25,600,000,000 cases"),
    "or-asserts-blowup": _vnnlib_case(_DECLARE + _BOX + "".join(f"(assert {_OR_OF_20})\n" for _ in range(8)),
                                      "taken together, expand to 25,600,000,000 cases"),
    "rows-blowup": _vnnlib_case(_DECLARE + _BOX + "(assert (and " + " ".join([_OR_OF_20] * 2) + " "
                                + " ".join(f"(<= Y_0 {k})" for k in range(300)) + "))\n", "(120,800 in all)"),
    "not-utf8": _vnnlib_case(_DECLARE.encode() + b"; caf\xe9\n" + _BOX.encode(), "p.vnnlib:20: not UTF-8 text"),
    "nul-byte": _vnnlib_case(_DECLARE + "\x00" + _BOX, "NUL character"),
    "undeclared-variable": _vnnlib_case(_DECLARE + _BOX + "(assert (<= Y_7 Y_1))\n", "Y_7 is used but not declared"),
    "wrong-input-count": _vnnlib_case(_vnnlib_text(inputs=2), "declares 2 inputs X_i, but m.onnx takes 16"),
    "wrong-output-count": _vnnlib_case(_vnnlib_text(outputs=5), "declares 5 outputs Y_j, but m.onnx has 3"),
    "missing-bound": _vnnlib_case(_DECLARE + _BOX.replace("(assert (<= X_3 0.2))\n", "") + "(assert (<= Y_0 Y_1))\n",
                                  "input X_3 (declared here) has no upper bound"),
    "lower-above-upper": _vnnlib_case(_DECLARE + _BOX + "(assert (>= X_2 0.5))\n(assert (<= Y_0 Y_1))\n",
                                      "empty input box: X_2 >= 0.5 and X_2 <= 0.2"),
    "bound-beyond-float32": _vnnlib_case(_vnnlib_text(low=-1e300, high=1e300), "does not fit in float32"),
    "empty-file": _vnnlib_case("", "no input variables declared"),
    "garbage": _vnnlib_case("this is not a property\n", "expected a command"),
    "huge-index": _vnnlib_case("(declare-const X_" + "9" * 5000 + " Real)\n", "cannot declare"),
    "vnnlib-and-eps": _vnnlib_case(_vnnlib_text(), "--eps does not apply", "--eps", "0.1"),
    "vnnlib-and-data": _vnnlib_case(_vnnlib_text(), "--data does not apply", "--data", "d.npz"),
    "vnnlib-missing": _args_case(["m.onnx", "--vnnlib", "gone.vnnlib"], "not found: gone.vnnlib"),
    "csv-one-column": _csv_case("m.onnx\n", "instances.csv:1: expected 'onnx,vnnlib[,timeout]', found 1 column"),
    "csv-four-columns": _csv_case("m.onnx,p.vnnlib,60,extra\n", "found 4 column(s)"),
    "csv-bad-timeout": _csv_case("m.onnx,p.vnnlib,soon\n", "timeout 'soon' is not a positive number of seconds"),
    "csv-negative-timeout": _csv_case("m.onnx,p.vnnlib,-5\n", "timeout '-5' is not a positive"),
    "csv-absolute-path": _csv_case("/etc/hostname,p.vnnlib,60\n", "'/etc/hostname' is an absolute path"),
    "csv-climbs-out": _csv_case("m.onnx,../p.vnnlib,60\n", "lies outside the csv's folder"),
    "csv-all-files-missing": _csv_case("gone.onnx,gone.vnnlib,60\n", "no usable rows"),
    "csv-not-utf8": _args_case(["--vnnlib", "instances.csv"], "not UTF-8 text",
                               prepare=lambda d: (d / "instances.csv").write_bytes(b"m.onnx,p\xff.vnnlib,60\n")),
}


def _npz_member(name: str, header_shape: tuple, payload: bytes) -> bytes:
    """One .npy member whose header announces `header_shape` (float64), followed by `payload`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": header_shape})
    return buffer.getvalue() + payload


def _lying_npz(d: Path) -> None:
    with zipfile.ZipFile(d / "d.npz", "w") as archive:
        archive.writestr("x.npy", _npz_member("x", (10 ** 12, 1, 4, 4), b"\0" * 64))
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(2, np.int64))
        archive.writestr("y.npy", buffer.getvalue())


def _data_case(prepare, expected: str, data: str = "d.npz"):
    def case(d: Path) -> list[str]:
        prepare(d)
        return ["m.onnx", "--data", data, "--eps", "0.1", "--json", "r.json"]
    return case, expected


def _image_folder(d: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (d / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        (d / "imgs" / name).write_bytes(content)


_PIXELS = np.random.default_rng(2).random((4, *SHAPE)).astype(np.float32)

DATA_CASES = {
    "npz-not-a-zip": _data_case(lambda d: (d / "d.npz").write_bytes(b"not a zip archive"), "cannot read d.npz as .npz"),
    "npz-truncated": _data_case(lambda d: _mutated_bytes_file(d / "d.npz"), "cannot read d.npz as .npz"),
    "npz-without-y": _data_case(lambda d: np.savez(d / "d.npz", x=_PIXELS), "has no array 'y'"),
    "npz-object-array": _data_case(lambda d: np.savez(d / "d.npz", x=np.array([object()] * 4, dtype=object),
                                                      y=np.arange(4)), "holds Python objects"),
    "npz-nan-pixels": _data_case(lambda d: np.savez(d / "d.npz", x=np.full((4, *SHAPE), np.nan, np.float32),
                                                    y=np.arange(4) % 3), "contains NaN or infinite values"),
    "npz-complex-pixels": _data_case(lambda d: np.savez(d / "d.npz", x=_PIXELS.astype(np.complex64),
                                                        y=np.arange(4) % 3), "has dtype complex64"),
    "npz-string-labels": _data_case(lambda d: np.savez(d / "d.npz", x=_PIXELS, y=np.array(["a", "b", "c", "d"])),
                                    "holds non-integer labels"),
    "npz-header-announces-terabytes": _data_case(_lying_npz, "announces shape (1000000000000, 1, 4, 4)"),
    "npz-empty-images": _data_case(lambda d: np.savez(d / "d.npz", x=np.zeros((4, 0, 0), np.float32),
                                                      y=np.arange(4) % 3), "images without pixels"),
    "npz-label-1e18": _data_case(lambda d: np.savez(d / "d.npz", x=_PIXELS, y=np.array([0, 1, 2, 10 ** 18])),
                                 "more than 100,000 classes"),
    "folder-without-images": _data_case(lambda d: _image_folder(d, {"cat/notes.txt": b"x", "dog/data.csv": b"1,2"}),
                                        "holds no images in class subfolders", data="imgs"),
    "folder-with-a-broken-png": _data_case(lambda d: _image_folder(d, {"cat/0.png": b"\x89PNG\r\n\x1a\nbroken"}),
                                           "cannot read image", data="imgs"),
    "unknown-dataset": _data_case(lambda d: None, "unknown dataset 'imagenet'", data="imagenet"),
    "empty-dataset-name": _data_case(lambda d: None, "no dataset given", data=""),
}


def _mutated_bytes_file(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


ALL_CASES = {**{f"model/{k}": v for k, v in MODEL_CASES.items()},
             **{f"output/{k}": v for k, v in OUTPUT_CASES.items()},
             **{f"option/{k}": v for k, v in OPTION_CASES.items()},
             **{f"vnnlib/{k}": v for k, v in VNNLIB_CASES.items()},
             **{f"data/{k}": v for k, v in DATA_CASES.items()}}


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, kit, tmp_path, monkeypatch):
    case, expected = ALL_CASES[name]
    folder = tmp_path / "run"
    shutil.copytree(kit, folder, symlinks=True)
    monkeypatch.chdir(folder)
    args = case(folder)
    before = _snapshot(folder)
    result = CliRunner().invoke(app, [*args, "--quiet"])
    _assert_one_line_error(result, expected)
    assert _snapshot(folder) == before, "the run wrote, removed or changed a file"


# ---------------------------------------------------------------------------------------------
# The library functions the fuzz tests drive: only UserError escapes them


def test_mutated_onnx_bytes_raise_only_user_errors(kit, tmp_path):
    """Byte-mutated copies of a real ONNX file (with harden metadata): each one imports, or fails
    with a UserError; never another exception (a seeded sample; fuzz tests run many more)."""
    import json

    model = onnx.load(str(kit / "m.onnx"))
    entry = model.metadata_props.add()
    entry.key, entry.value = "harden.data", json.dumps({"dataset": "mnist", "input_range": [0.0, 1.0],
                                                        "classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25]})
    original = model.SerializeToString()
    rng = np.random.default_rng(7)
    path = tmp_path / "mutated.onnx"
    outcomes = {"imported": 0, "refused": 0}
    for _ in range(150):
        data = bytearray(original)
        for position in rng.integers(0, len(data), rng.integers(1, 6)):
            data[position] = rng.integers(0, 256)
        path.write_bytes(bytes(data))
        try:
            import_onnx(path)
            outcomes["imported"] += 1
        except UserError:
            outcomes["refused"] += 1
    assert outcomes["imported"] > 0 and outcomes["refused"] > 0, outcomes


def test_expansion_is_refused_before_it_is_built(tmp_path):
    """An `and` of 12 `or`s of 50 cases would be 2.4e20 conjunctions: refused at once, not after
    building them; the text is tiny."""
    path = tmp_path / "blowup.vnnlib"
    ors = "(or " + " ".join(f"(>= Y_1 {k})" for k in range(50)) + ")"
    path.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
                    "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (and " + " ".join([ors] * 12) + "))\n")
    started = time.perf_counter()
    with pytest.raises(UserError, match="expands to"):
        parse_vnnlib(path)
    assert time.perf_counter() - started < 2.0


def test_deep_nesting_is_a_user_error_whatever_the_depth(tmp_path):
    path = tmp_path / "deep.vnnlib"
    for depth in (101, 5_000, 200_000):
        path.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert " + "(or " * depth
                        + "(<= Y_0 0)" + ")" * (depth + 1) + "\n")
        with pytest.raises(UserError, match="nested more than 100 levels deep"):
            parse_vnnlib(path)


# ---------------------------------------------------------------------------------------------
# What a fixed batch is: a batch of 2 certifies like any other model


def test_fixed_batch_of_two_is_certified(kit, tmp_path, monkeypatch):
    """A graph with a fixed batch of 2 is read per sample (the onnxruntime checks feed it whole
    batches); dataset runs and VNN-LIB runs both work on it."""
    folder = tmp_path / "run"
    shutil.copytree(kit, folder, symlinks=True)
    monkeypatch.chdir(folder)
    _classifier(folder / "m.onnx", batch=2)
    result = CliRunner().invoke(app, [*_DATASET, "--limit", "4", "--method", "ibp", "--attack-steps", "5",
                                      "--json", "r.json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (folder / "r.json").is_file()
    (folder / "p.vnnlib").write_text(_vnnlib_text(low=0.0, high=1.0))  # a wide box: falsified, confirmed by onnxruntime
    result = CliRunner().invoke(app, [*_VNN, "--method", "ibp", "--attack-steps", "10", "--cex-dir", "cex", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(list((folder / "cex").glob("*.counterexample"))) == 1, result.output


# ---------------------------------------------------------------------------------------------
# The real process: stderr holds the one line and nothing else; kill -9 leaves no file


def _certify_process(args: list[str], cwd: Path, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "certify", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_the_process_prints_one_line_and_nothing_else(kit, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(kit, folder, symlinks=True)
    _classifier(folder / "m.onnx", batch=2 ** 31)
    (folder / "q.vnnlib").write_text(_vnnlib_text() + "(assert (<= (* 1e200 1e200 Y_0) Y_1))\n")
    for args, expected in ((["m.onnx", "--data", "d.npz", "--eps", "0.1"], "[2147483648, 1, 4, 4]"),
                           (["--vnnlib", "q.vnnlib"], "q.vnnlib"),
                           (["m.onnx", "--eps", "0.1", "--limit", "x"], "--limit")):
        done = _certify_process(args, folder)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines


def test_kill_9_of_a_run_with_json_leaves_no_file(kit, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(kit, folder, symlinks=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # 10^7 PGD steps per sample: the run is certainly still certifying when it is killed.
    process = subprocess.Popen([sys.executable, "-m", "certify", "m.onnx", "--data", "d.npz", "--eps", "0.3",
                                "--attack-steps", "10000000", "--json", "r.json", "--plot", "r.png", "--quiet"],
                               cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(6)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted(p.name for p in kit.iterdir()), left
