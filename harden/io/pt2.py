"""Read a `torch.export` archive (.pt2) without running anything the file carries.

`torch.export.load` is not safe on a file from someone else. Reading torch 2.13's loader
(torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py), a crafted archive gets
code run by:
  - the sample inputs, and the legacy weights and constants files: `deserialize_torch_artifact`
    tries `torch.load(weights_only=True)` and, when that refuses, tries again with weights_only=False;
  - weights and tensor constants marked `use_pickle`: `torch.load(weights_only=False)`;
  - "opaque object" constants: `pickle.loads`; "custom object" constants: the TorchScript
    unpickler (`torch._C._pickle_load_obj`);
  - AOTInductor members (data/aotinductor/): a shared library from the archive is loaded;
  - symbolic-shape expressions (`expr_str`): `sympy.sympify`, which evaluates its string;
  - names (parameter FQNs, dict keys in the input spec) that torch.fx pastes between quotes into
    the Python source of the module it generates and execs;
  - `guards_code`: Python source that `ExportedProgram.module()` execs;
  - and, once the model runs, graph nodes calling aten::save (writes any file) or aten::from_file.
So this module reads the archive itself, from bytes already in memory (what is checked is what is
used): tensors from their raw records, the few pickles through the restricted unpickler only, and
the program JSON after checking every string in it against a plain-name character set, every
symbolic expression against a small grammar and every op against an allow-list (aten ops and the
symbolic-int operators, without the file ops). The guards and the debugging metadata (stack
traces, module paths) are dropped: torch derives the input checks again from the graph. Only that
checked document reaches torch's deserializer, with the tensors as ready dicts so that it
unpickles nothing; members it does not read (AOTInductor libraries, extra files) stay inert bytes.
Anything outside that subset is refused with a UserError that names `--trust-pickle`, which loads
the archive with `torch.export.load`. The deserializer is torch's private API (torch._export.serde),
so a torch without it gets a UserError too.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certify.common.errors import UserError
from harden.io.pt2_program import _MODEL_JSON, _PLAIN, _NotPt2, _Refused, _check_graph, _checked_program, _json

# Member names inside the archive's root folder (torch/csrc/export/pt2_archive_constants.h).
_VERSION = "archive_version"
_WEIGHTS_DIR = "data/weights/"
_CONSTANTS_DIR = "data/constants/"
_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
_CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
_LEGACY_WEIGHTS = "data/weights/model.pt"
_LEGACY_CONSTANTS = "data/constants/model.pt"
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_TENSOR_CONSTANT_PREFIX = "tensor_"

_TRUST_HINT = "export the model to ONNX or TorchScript instead, or pass --trust-pickle if you trust its origin"


def read_exported_program(data: bytes, path: Path, *, trust_pickle: bool = False):
    """The `torch.export.ExportedProgram` in the .pt2 archive `data` (the bytes of `path`)."""
    if trust_pickle:
        try:
            return torch.export.load(io.BytesIO(data))
        except Exception as exc:  # torch raises many types on a damaged archive
            raise UserError(f"{path} could not be loaded by torch.export.load ({_first_line(exc)})",
                            "check that the file is a complete torch.export.save archive") from None
    try:
        return _read(data)
    except _Refused as why:
        raise UserError(f"{path} {why}; torch.export.load would run it as code", _TRUST_HINT) from None
    except UserError as error:  # these messages start with what the file is or holds
        raise UserError(f"{path} {error.what}", error.hint) from None
    except RecursionError:
        raise UserError(f"{path} is a damaged torch.export archive (nested too deeply)",
                        "re-export it with torch.export.save") from None
    except Exception as exc:  # a damaged or crafted document fails inside torch in many ways
        raise UserError(f"{path} is not a torch.export archive harden can read ({_first_line(exc)})",
                        "re-export it with torch.export.save, or export to ONNX") from None


def program_module(program) -> nn.Module:
    """A plain callable module for an ExportedProgram: torch.export's own `module()` refuses
    .train()/.eval(), which the ONNX exporter calls; it is already in inference form."""
    return _ExportedProgramModule(program.module())


class _ExportedProgramModule(nn.Module):
    def __init__(self, program_module: nn.Module):
        super().__init__()
        self.program_module = program_module

    def train(self, mode: bool = True):
        return self

    def forward(self, x):
        return self.program_module(x)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


# -- the archive ------------------------------------------------------------------------------------

class _Archive:
    """The members of a zip archive in memory, by name below its root folder."""

    def __init__(self, data: bytes):
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
            raise UserError(f"is a damaged zip archive ({_first_line(exc)})", "re-create it") from None
        if any(info.filename == "serialized_exported_program.json" for info in infos):
            raise UserError("is in the torch.export format of torch 2.7 and older, which harden reads only "
                            "through torch.export.load", "re-save it with torch.export.save in a newer torch, "
                            "or pass --trust-pickle if you trust its origin")
        roots = {info.filename.split("/", 1)[0] for info in infos}
        if len(roots) != 1 or any("/" not in info.filename for info in infos):
            raise _NotPt2("its members are not in one root folder, as torch.export.save writes them")
        root = roots.pop() + "/"
        self.members = {info.filename[len(root):]: info for info in infos}

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def read(self, name: str) -> bytes:
        info = self.members.get(name)
        if info is None:
            raise _NotPt2(f"the member {name} is missing")
        if info.compress_type != zipfile.ZIP_STORED:
            # torch.export.save stores every member; a compressed one could unpack to any size.
            raise _NotPt2(f"the member {name} is compressed, which torch.export.save never does")
        return self.zip.read(info)



def _read(data: bytes):
    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    except ImportError:
        raise UserError(f"cannot be read safely with torch {torch.__version__} (it lacks the torch.export "
                        "deserializer harden uses)", "export the model to ONNX or TorchScript, or pass "
                        "--trust-pickle if you trust its origin") from None

    archive = _Archive(data)
    version = archive.read(_VERSION).decode("ascii", "replace").strip()
    if version != "0":
        raise _NotPt2(f"archive version {version[:20]!r}, this reader knows version 0")
    if _MODEL_JSON not in archive:
        names = sorted(name for name in archive.members if name.startswith("models/"))
        if names:
            raise _NotPt2(f"it holds {names[:3]} but no models/model.json")
        if any(name.startswith("data/aotinductor/") for name in archive.members):
            raise _Refused("holds only AOTInductor-compiled native code (a shared library)")
        raise _NotPt2("it has no models/model.json")
    document = _checked_program(archive.read(_MODEL_JSON))
    state_dict = _tensors(archive, _WEIGHTS_CONFIG, _LEGACY_WEIGHTS, _WEIGHTS_DIR, "weight")
    constants = _tensors(archive, _CONSTANTS_CONFIG, _LEGACY_CONSTANTS, _CONSTANTS_DIR, "constant")
    example_inputs = _sample_inputs(archive)
    serialized = _bytes_to_dataclass(schema.ExportedProgram, json.dumps(document).encode("utf-8"))
    program = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, example_inputs)
    _check_graph(program.graph)
    return program


def _sample_inputs(archive: _Archive):
    if _SAMPLE_INPUTS not in archive:
        return None
    value = _restricted_load(archive.read(_SAMPLE_INPUTS), _SAMPLE_INPUTS)
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple)
            and isinstance(value[1], dict)):
        raise _NotPt2("its sample inputs are not an (args, kwargs) pair")
    return value


def _restricted_load(raw: bytes, name: str):
    import pickle

    try:
        # weights_only refuses every global outside torch's allow-list BEFORE calling it.
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _Refused(f"carries a pickled Python object in {name}") from None
    except Exception as exc:  # damaged pickle or zip record
        raise _NotPt2(f"{name} is damaged ({_first_line(exc)})") from None


# -- tensors --------------------------------------------------------------------------------------------

def _tensors(archive: _Archive, config_name: str, legacy_name: str, folder: str, what: str) -> dict:
    if legacy_name in archive:
        value = _restricted_load(archive.read(legacy_name), legacy_name)
        if not isinstance(value, dict) or not all(isinstance(k, str) and _PLAIN.fullmatch(k) and
                                                  isinstance(v, torch.Tensor) for k, v in value.items()):
            raise _NotPt2(f"{legacy_name} is not a dict of named tensors")
        return value
    if config_name not in archive:
        raise _NotPt2(f"the member {config_name} is missing")
    config = _json(archive.read(config_name), config_name)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _NotPt2(f"{config_name} has no 'config' record")
    bases: dict[str, torch.Tensor] = {}  # one storage per record, so that aliasing survives
    out = {}
    for fqn, meta in entries.items():
        if not _PLAIN.fullmatch(fqn) or not fqn:
            raise _Refused(f"names a {what} {fqn[:60]!r} with characters outside [A-Za-z0-9_.-]")
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise _NotPt2(f"the {what} record of {fqn} is damaged")
        record = meta["path_name"]
        if not _PLAIN.fullmatch(record):
            raise _NotPt2(f"the {what} record name {record[:60]!r} is not a plain name")
        if what == "constant" and not record.startswith(_TENSOR_CONSTANT_PREFIX):
            raise _Refused(f"holds the constant {fqn} as a pickled Python or TorchScript object ({record})")
        if meta.get("use_pickle") is True:
            tensor = _restricted_load(archive.read(folder + record), folder + record)
            if not isinstance(tensor, torch.Tensor):
                raise _NotPt2(f"the {what} {fqn} is a {type(tensor).__name__}, not a tensor")
        elif meta.get("use_pickle") is False:
            tensor = _raw_tensor(archive, folder + record, meta.get("tensor_meta"), bases, fqn)
        else:
            raise _NotPt2(f"the {what} record of {fqn} is damaged (use_pickle)")
        if meta.get("is_param") is True:
            tensor_meta = meta.get("tensor_meta") if isinstance(meta.get("tensor_meta"), dict) else {}
            tensor = nn.Parameter(tensor, requires_grad=tensor_meta.get("requires_grad") is True)
        out[fqn] = tensor
    return out


def _raw_tensor(archive: _Archive, name: str, meta: Any, bases: dict, fqn: str) -> torch.Tensor:
    from torch._export.serde.serialize import deserialize_scalar_type

    if not isinstance(meta, dict):
        raise _NotPt2(f"the tensor record of {fqn} has no tensor_meta")
    dtype = deserialize_scalar_type(meta.get("dtype"))
    sizes = [_int_field(s, fqn) for s in _list(meta.get("sizes"), fqn)]
    strides = [_int_field(s, fqn) for s in _list(meta.get("strides"), fqn)]
    offset = _int_field(meta.get("storage_offset"), fqn)
    if len(sizes) != len(strides) or len(sizes) > 16:
        raise _NotPt2(f"the tensor {fqn} has {len(sizes)} sizes and {len(strides)} strides")
    base = bases.get(name)
    if base is None:
        raw = archive.read(name)
        element = torch.empty((), dtype=dtype).element_size()
        if len(raw) % element:
            raise _NotPt2(f"the record {name} of {len(raw)} bytes does not hold whole {dtype} elements")
        base = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        bases[name] = base
    if 0 not in sizes:
        last = offset + sum((size - 1) * stride for size, stride in zip(sizes, strides))
        if last >= base.numel():
            raise _NotPt2(f"the tensor {fqn} of shape {sizes} does not fit in its record of "
                          f"{base.numel()} elements")
    return torch.as_strided(base, sizes, strides, offset)


def _list(value: Any, fqn: str) -> list:
    if not isinstance(value, list):
        raise _NotPt2(f"the tensor record of {fqn} is damaged")
    return value


def _int_field(value: Any, fqn: str) -> int:
    # {"as_int": n}; a symbolic size in a stored tensor is not something a file should hold.
    number = value.get("as_int") if isinstance(value, dict) else None
    if type(number) is not int or not 0 <= number < 2 ** 62:
        raise _NotPt2(f"the tensor record of {fqn} has a size, stride or offset that is not a plain integer")
    return number


