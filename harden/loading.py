"""Load a model from any accepted file format into a `Bundle`.

Accepted: harden safetensors bundles; bare safetensors or state dicts (`torch.save(model.state_dict())`)
with `--arch`; TorchScript archives; `torch.export` programs (.pt2); ONNX. A fully pickled module is
read only with `trust_pickle=True`, because unpickling runs arbitrary code.

Formats that are not editable modules (TorchScript, .pt2, ONNX) all take one route: they are
exported to / read as ONNX and imported into a module of standard layers (certify.onnx_import),
so the layer rewrites see ordinary nn.Conv2d / nn.Linear everywhere.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

from certify.errors import UserError
from harden.architecture import build_plain_module, resolve_arch
from harden.bundle import Bundle, check_finite, encode_graph, file_source, load_bundle, read_metadata

ACCEPTED = ("harden .safetensors bundle, state dict (.pt/.safetensors) with --arch, TorchScript archive, "
            "torch.export .pt2, ONNX, or a pickled module with --trust-pickle")
DEFAULT_INPUT_SHAPE = (1, 28, 28)


def detect_format(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < path.stat().st_size:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(name.endswith("serialized_exported_program.json") or "/models/" in name and name.endswith(".json")
               for name in names):
            return "pt2"
        if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in names):
            return "torch-pickle"
        return "unknown"
    if head[:1] == b"\x80":
        return "torch-pickle"
    if _looks_like_onnx(path):
        return "onnx"
    return "unknown"


def _looks_like_onnx(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # onnx raises several protobuf error types on junk
        return False
    return len(model.graph.node) > 0


def load_model(path: str | Path, *, arch: str | None = None, trust_pickle: bool = False, trust_code: bool = False,
               input_shape: tuple[int, ...] | None = None, num_classes: int | None = None) -> Bundle:
    """Load `path` (any accepted format) and check that it is a usable classifier."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist", "check the path")
    fmt = detect_format(path)
    if fmt == "safetensors" and read_metadata(path) is not None:
        bundle = load_bundle(path)
    elif fmt in ("safetensors", "torch-pickle"):
        bundle = _load_weights(path, fmt, arch, trust_pickle, input_shape, num_classes)
    elif fmt in ("torchscript", "pt2"):
        bundle = _load_via_onnx_export(path, fmt, input_shape)
    elif fmt == "onnx":
        bundle = _bundle_from_onnx_bytes(path.read_bytes(), source=file_source(path, "onnx"))
    else:
        raise UserError(f"{path} is not a model file harden can read", f"give a {ACCEPTED}")
    validate_classifier(bundle)
    return bundle


def _load_weights(path: Path, fmt: str, arch: str | None, trust_pickle: bool,
                  input_shape, num_classes) -> Bundle:
    input_shape = tuple(input_shape or DEFAULT_INPUT_SHAPE)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # weights_only refuses any object that is not plain tensors/containers BEFORE running it.
            if not trust_pickle:
                raise UserError(f"{path} is a pickled Python object, and unpickling runs code",
                                "re-save it as a state dict or TorchScript, or pass --trust-pickle if you trust its origin") from None
            return _load_trusted_pickle(path, input_shape, num_classes)
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"{path} could not be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                            "the file is truncated or damaged; re-create it") from None
        if isinstance(state, nn.Module):  # possible only when torch allow-lists it
            raise UserError(f"{path} holds a pickled module", "pass --trust-pickle, or save a state dict")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors",
                            "save model.state_dict() (or a TorchScript archive)")
    if arch is None:
        raise UserError(f"{path} holds weights only (a state dict)",
                        "name the architecture with --arch small-cnn|mlp|package.module:factory")
    check_finite(state, what=str(path))
    record = resolve_arch(arch)
    module = build_plain_module(record, input_shape, num_classes or 10)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"the weights in {path} do not fit --arch {arch} ({str(exc).splitlines()[0]})",
                        "check --arch (and --input-shape for built-in architectures)") from None
    out_classes = _output_classes(module, input_shape)
    return Bundle(module.eval(), input_shape, out_classes, record, source=file_source(path, fmt))


def _load_trusted_pickle(path: Path, input_shape, num_classes) -> Bundle:
    module = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(module, nn.Module):
        raise UserError(f"{path} unpickled to a {type(module).__name__}, not a torch.nn.Module",
                        "save the model itself, or a state dict with --arch")
    return _bundle_from_module_via_onnx(module.eval(), input_shape, file_source(path, "pickle"))


def _load_via_onnx_export(path: Path, fmt: str, input_shape) -> Bundle:
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
        shape = tuple(input_shape or DEFAULT_INPUT_SHAPE)
    else:
        program = torch.export.load(str(path))
        example = program.example_inputs[0][0] if program.example_inputs else None
        shape = tuple(input_shape or (tuple(example.shape[1:]) if example is not None else DEFAULT_INPUT_SHAPE))
        module = _ExportedProgramModule(program.module())
    return _bundle_from_module_via_onnx(module, shape, file_source(path, fmt))


class _ExportedProgramModule(nn.Module):
    """A torch.export program's module refuses .train()/.eval(), which the ONNX exporter calls;
    it is already in inference form, so mode switches here stop before reaching it."""

    def __init__(self, program_module: nn.Module):
        super().__init__()
        self.program_module = program_module

    def train(self, mode: bool = True):
        return self

    def forward(self, x):
        return self.program_module(x)


def _bundle_from_module_via_onnx(module: nn.Module, input_shape, source: dict) -> Bundle:
    from harden.export import module_to_onnx_bytes

    onnx_bytes = module_to_onnx_bytes(module, tuple(input_shape))
    return _bundle_from_onnx_bytes(onnx_bytes, source=source)


def _bundle_from_onnx_bytes(onnx_bytes: bytes, *, source: dict) -> Bundle:
    import tempfile

    from certify.onnx_import import import_onnx

    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "model.onnx"
        onnx_path.write_bytes(onnx_bytes)
        imported = import_onnx(onnx_path)
    data = _data_from_onnx_metadata(imported.metadata)
    input_shape = tuple(imported.input_shape)
    num_classes = _output_classes(imported.module, input_shape)
    arch = {"kind": "onnx-graph", "name": f"onnx graph from {Path(source['path']).name}",
            "graph": encode_graph(onnx_bytes)}
    return Bundle(imported.module.eval(), input_shape, num_classes, arch, data=data, source=source)


def _data_from_onnx_metadata(metadata: dict[str, str]) -> dict:
    import json

    raw = metadata.get("harden.data")
    return json.loads(raw) if raw else {}


def _output_classes(module: nn.Module, input_shape) -> int:
    with torch.no_grad():
        try:
            out = module.eval()(torch.zeros(2, *input_shape))
        except Exception as exc:  # a user's model can fail in any way on a wrong shape
            raise UserError(f"the model does not run on inputs of shape (batch, {', '.join(map(str, input_shape))}) "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                            "give the per-sample input shape with --input-shape C,H,W") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the model's output has shape {shape} for a batch of 2, not (batch, classes)",
                        "harden works on classifiers that return one logit per class")
    return int(out.shape[1])


def validate_classifier(bundle: Bundle) -> None:
    check_finite(bundle.module.state_dict(), what="the model")
    classes = _output_classes(bundle.module, bundle.input_shape)
    if classes != bundle.num_classes:
        raise UserError(f"the model returns {classes} classes but its file says {bundle.num_classes}",
                        "the file is damaged; re-create it")
    if classes < 2:
        raise UserError("the model returns a single output", "harden needs one logit per class (2 or more)")
