"""Load a model from any accepted file format into a `Bundle`.

Accepted: harden safetensors bundles; bare safetensors or state dicts (`torch.save(model.state_dict())`)
with `--arch`; TorchScript archives; `torch.export` programs (.pt2); ONNX. A fully pickled module is
read only with `trust_pickle=True`, because unpickling runs arbitrary code.

Nothing in a file runs code unless the user says so: the file is read once into memory, its format
is found from its content (never its name), and every parser works on those bytes. State dicts go
through torch's restricted unpickler, .pt2 archives through `harden.io.pt2` (which reads them without
torch.export.load), and a bundle's architecture factory is imported only when the user named it
(`--arch`) or passed `trust_code`. Every way a file can be wrong ends in a UserError.

Formats that are not editable modules (TorchScript, .pt2, ONNX) all take one route: they are
exported to / read as ONNX and imported into a module of standard layers (certify.onnx_import.reader),
so the layer rewrites see ordinary nn.Conv2d / nn.Linear everywhere.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

from certify.common.errors import UserError, load_untrusted_json
from harden.io.architecture import build_plain_module, encode_graph, resolve_arch
from harden.io.bundle import Bundle
from harden.io.bundle_checks import check_data, check_input_shape
from harden.io.bundle_file import (bundle_from_bytes, check_finite, file_source, load_tensors, read_model_bytes,
                                   safetensors_metadata)

ACCEPTED = ("harden .safetensors bundle, state dict (.pt/.safetensors) with --arch, TorchScript archive, "
            "torch.export .pt2, ONNX, or a pickled module with --trust-pickle")
DEFAULT_INPUT_SHAPE = (1, 28, 28)
_DAMAGED = "the file is truncated or damaged; re-create it"


def detect_format(path: str | Path) -> str:
    """The format of the file at `path`, from its content."""
    return detect_format_of_bytes(read_model_bytes(path))


def detect_format_of_bytes(data: bytes) -> str:
    if len(data) >= 9:
        (header_len,) = struct.unpack("<Q", data[:8])
        if data[8:9] == b"{" and 0 < header_len <= len(data) - 8:
            return "safetensors"
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = archive.namelist()
                unpacked = sum(info.file_size for info in archive.infolist())
        except Exception:  # BadZipFile, and struct/value errors on crafted directories
            return "damaged-zip"
        if unpacked > 2 * len(data) + (64 << 20):
            return "damaged-zip"  # torch stores members uncompressed: this one would unpack to far more
        if any(name.endswith("serialized_exported_program.json") or "/models/" in name and name.endswith(".json")
               or name.endswith("/archive_format") for name in names):
            return "pt2"
        if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in names):
            return "torch-pickle"
        return "unknown"
    if data[:1] == b"\x80":
        return "torch-pickle"
    if _looks_like_onnx(data):
        return "onnx"
    return "unknown"


def _looks_like_onnx(data: bytes) -> bool:
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # onnx raises several protobuf error types on junk
        return False
    return len(model.graph.node) > 0


def load_model(path: str | Path, *, arch: str | None = None, trust_pickle: bool = False, trust_code: bool = False,
               input_shape: tuple[int, ...] | None = None, num_classes: int | None = None) -> Bundle:
    """Load `path` (any accepted format) and check that it is a usable classifier.

    `trust_pickle` allows what runs code from the file itself (a pickled module; a .pt2 read by
    torch.export.load); `trust_code` allows a bundle to import the architecture factory it records."""
    path = Path(path)
    if input_shape is not None:
        input_shape = check_input_shape(tuple(input_shape), _option_error, "--input-shape")
    data = read_model_bytes(path)
    fmt = detect_format_of_bytes(data)
    if fmt == "safetensors" and "harden.format" in safetensors_metadata(data, str(path)):
        bundle = bundle_from_bytes(data, path, arch=arch, trust_code=trust_code)
    elif fmt in ("safetensors", "torch-pickle"):
        bundle = _load_weights(path, data, fmt, arch, trust_pickle, input_shape, num_classes)
    elif fmt == "torchscript":
        bundle = _load_torchscript(path, data, input_shape, trust_pickle)
    elif fmt == "pt2":
        bundle = _load_exported_program(path, data, input_shape, trust_pickle)
    elif fmt == "onnx":
        bundle = _bundle_from_onnx_file(path, data)
    elif fmt == "damaged-zip":
        raise UserError(f"{path} is a damaged zip archive", _DAMAGED)
    else:
        raise UserError(f"{path} is not a model file harden can read", f"give a {ACCEPTED}")
    validate_classifier(bundle)
    return bundle


def _option_error(detail: str) -> UserError:
    return UserError(detail, "e.g. --input-shape 1,28,28")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _load_weights(path: Path, data: bytes, fmt: str, arch: str | None, trust_pickle: bool,
                  input_shape, num_classes) -> Bundle:
    input_shape = tuple(input_shape or DEFAULT_INPUT_SHAPE)
    if fmt == "safetensors":
        state = load_tensors(data, str(path))
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # weights_only refuses any object that is not plain tensors/containers BEFORE running it.
            if not trust_pickle:
                raise UserError(f"{path} is a pickled Python object, and unpickling runs code",
                                "re-save it as a state dict or TorchScript, or pass --trust-pickle if you trust its origin") from None
            return _load_trusted_pickle(path, data, input_shape)
        except Exception as exc:  # RuntimeError, EOFError, BadZipFile, ... on a damaged file
            raise UserError(f"{path} could not be read ({_first_line(exc)})", _DAMAGED) from None
        if isinstance(state, nn.Module):  # possible only when torch allow-lists it
            raise UserError(f"{path} holds a pickled module", "pass --trust-pickle, or save a state dict")
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors",
                            "save model.state_dict() (or a TorchScript archive)")
    if arch is None:
        raise UserError(f"{path} holds weights only (a state dict)",
                        "name the architecture with --arch small-cnn|mlp|package.module:factory")
    check_finite(state, what=str(path))
    record = resolve_arch(arch)
    # the weights of a built-in architecture are in this file: one that could not fit is not built
    module = build_plain_module(record, input_shape, num_classes or 10, max_elements=len(data))
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise UserError(f"the weights in {path} do not fit --arch {arch} ({_first_line(exc)})",
                        "check --arch (and --input-shape for built-in architectures)") from None
    out_classes = _output_classes(module, input_shape)
    return Bundle(module.eval(), input_shape, out_classes, record, source=file_source(path, fmt, data))


def _load_trusted_pickle(path: Path, data: bytes, input_shape) -> Bundle:
    try:
        module = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # the user trusted the file; it can still be damaged or need missing classes
        raise UserError(f"{path} could not be unpickled ({type(exc).__name__}: {_first_line(exc)})",
                        "check that the classes it needs are importable, or save a state dict") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"{path} unpickled to a {type(module).__name__}, not a torch.nn.Module",
                        "save the model itself, or a state dict with --arch")
    return _bundle_from_module_via_onnx(module.eval(), input_shape, file_source(path, "pickle", data), path)


def _load_torchscript(path: Path, data: bytes, input_shape, trust_pickle: bool) -> Bundle:
    # torch.jit.load reads data.pkl / constants.pkl with TorchScript's own C++ unpickler, which
    # resolves only TorchScript and torch types (no Python pickle), and compiles code/ as
    # TorchScript, not Python. What that code can still do outside the model is file access:
    # torch.save (aten::save) writes any file, torch.from_file reads one, and a module's
    # __setstate__ runs during torch.jit.load itself. TorchScript has no way to name an op but
    # literally, so a look at the source finds them.
    if not trust_pickle:
        _refuse_file_access(path, data)
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:
        raise UserError(f"{path} is not a TorchScript archive harden can read ({_first_line(exc)})", _DAMAGED) from None
    shape = tuple(input_shape or DEFAULT_INPUT_SHAPE)
    return _bundle_from_module_via_onnx(module, shape, file_source(path, "torchscript", data), path)


_FILE_ACCESS = re.compile(rb"\b(save|from_file)\b")


def _refuse_file_access(path: Path, data: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if "/code/" not in info.filename or info.filename.endswith(".debug_pkl"):
                continue
            if info.file_size > 64 << 20:
                raise UserError(f"{path} holds a TorchScript source file of {info.file_size} bytes", _DAMAGED)
            try:
                source = archive.read(info)
            except Exception as exc:  # damaged member; let torch.jit.load report the archive
                raise UserError(f"{path} is a damaged TorchScript archive ({_first_line(exc)})", _DAMAGED) from None
            found = _FILE_ACCESS.search(source)
            if found:
                raise UserError(f"{path} holds TorchScript code that calls {found.group(1).decode()} "
                                f"({info.filename.split('/code/', 1)[1][:80]}), which reads or writes files "
                                "when the model runs", "re-export the model without it, or pass --trust-pickle "
                                "if you trust its origin")


def _load_exported_program(path: Path, data: bytes, input_shape, trust_pickle: bool) -> Bundle:
    from harden.io.pt2 import program_module, read_exported_program

    program = read_exported_program(data, path, trust_pickle=trust_pickle)
    if input_shape is None:
        try:
            example = program.example_inputs[0][0] if program.example_inputs else None
        except (IndexError, KeyError, TypeError):
            example = None
        if isinstance(example, torch.Tensor) and example.dim() >= 2:
            input_shape = check_input_shape(tuple(example.shape[1:]), _damaged_pt2(path), "its sample input shape")
        else:
            input_shape = DEFAULT_INPUT_SHAPE
    batch = _fixed_batch(program)
    if batch is not None and batch != 2:
        # torch.export bakes a static batch into guards and shapes; harden runs batches of 2 and more.
        raise UserError(f"{path} was exported for a fixed batch of {batch}",
                        "re-export it with a dynamic batch: torch.export.export(model, (x,), "
                        "dynamic_shapes=({0: torch.export.Dim('batch')},)), or export to ONNX")
    try:
        module = program_module(program)
    except Exception as exc:
        raise UserError(f"{path} could not be turned into a module ({_first_line(exc)})",
                        "re-export it with torch.export, or export to ONNX") from None
    return _bundle_from_module_via_onnx(module, tuple(input_shape), file_source(path, "pt2", data), path)


def _fixed_batch(program) -> int | None:
    """The batch size a program's (first) input is fixed to, or None when it is symbolic or unknown."""
    try:
        name = program.graph_signature.user_inputs[0]
        node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
        size = node.meta["val"].shape[0]
    except Exception:  # no user input, no shape: the conversion reports what is wrong
        return None
    return size if type(size) is int else None


def _damaged_pt2(path: Path):
    return lambda detail: UserError(f"{path}: {detail}", "give the per-sample input shape with --input-shape C,H,W")


def _bundle_from_module_via_onnx(module: nn.Module, input_shape, source: dict, path: Path) -> Bundle:
    import tempfile

    from harden.io.export import module_to_onnx_bytes

    _output_classes(module, input_shape)  # a clear message for the common failure: a wrong input shape
    try:
        onnx_bytes = module_to_onnx_bytes(module, tuple(input_shape))
    except UserError:
        raise
    except Exception as exc:  # the exporter fails in many ways on what it cannot express
        raise UserError(f"{path} could not be converted to ONNX for the layer rewrites "
                        f"({type(exc).__name__}: {_first_line(exc)})",
                        "export the model to ONNX yourself and give harden the .onnx file") from None
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "model.onnx"
        onnx_path.write_bytes(onnx_bytes)
        try:
            return _bundle_from_imported(onnx_path, onnx_bytes, source)
        except UserError as error:  # name the user's file, not the temporary one
            raise UserError(error.what.replace(str(onnx_path), f"{path} (as ONNX)"), error.hint) from None


def _bundle_from_onnx_file(path: Path, data: bytes) -> Bundle:
    # Imported from its own path, so that external data next to it is found (and the importer's
    # check of where external data may live applies to the real folder).
    import onnx

    try:
        header = onnx.load_model_from_string(data)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_initializers(header.graph))
    except Exception:  # the importer reports a damaged file properly
        external = False
    bundle = _bundle_from_imported(path, data, file_source(path, "onnx", data))
    if external:
        # The graph recorded in a bundle must stand alone: inline the weights (import_onnx has
        # just checked where they live).
        try:
            bundle.arch["graph"] = encode_graph(onnx.load(str(path)).SerializeToString())
        except Exception as exc:
            raise UserError(f"the external data of {path} could not be read ({_first_line(exc)})",
                            "keep the data files next to the model, or save the model without external data") from None
    return bundle


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t


def _bundle_from_imported(onnx_path: Path, onnx_bytes: bytes, source: dict) -> Bundle:
    from certify.onnx_import.reader import import_onnx

    imported = import_onnx(onnx_path)
    data = _data_from_onnx_metadata(imported.metadata, source)
    input_shape = check_input_shape(tuple(imported.input_shape), _input_error(source), "its input shape")
    num_classes = _output_classes(imported.module, input_shape)
    arch = {"kind": "onnx-graph", "name": f"onnx graph from {Path(source['path']).name}",
            "graph": encode_graph(onnx_bytes)}
    return Bundle(imported.module.eval(), input_shape, num_classes, arch, data=data, source=source)


def _input_error(source: dict):
    return lambda detail: UserError(f"{source['path']}: {detail}", "harden handles per-sample inputs of up to 16M values")


def _data_from_onnx_metadata(metadata: dict[str, str], source: dict) -> dict:
    """harden.data from an ONNX file's metadata. Damaged data is an error, not something to skip:
    it says how certification must read the inputs (range, normalization)."""

    raw = metadata.get("harden.data")
    if not raw:
        return {}

    def damaged(detail: str) -> UserError:
        return UserError(f"the harden metadata of {source['path']} is damaged ({detail})",
                         "re-export the model with harden export, or remove its 'harden.data' metadata")

    try:
        value = load_untrusted_json(raw, "harden.data")
    except UserError as exc:
        raise damaged(exc.what) from None
    return check_data(value, damaged)


def _output_classes(module: nn.Module, input_shape) -> int:
    with torch.no_grad():
        try:
            out = module.eval()(torch.zeros(2, *input_shape))
        except Exception as exc:  # a user's model can fail in any way on a wrong shape
            raise UserError(f"the model does not run on inputs of shape (batch, {', '.join(map(str, input_shape))}) "
                            f"({type(exc).__name__}: {_first_line(exc)})",
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
