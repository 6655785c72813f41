"""A model as harden passes it from step to step: the module plus everything needed to rebuild it.

On disk a bundle is ONE safetensors file: the tensors of `module.state_dict()` and, in the
safetensors metadata (string -> string), JSON documents:
  harden.format   "1"
  harden.arch     how to build the plain module: {"kind": "zoo", "name": "small-cnn"},
                  {"kind": "factory", "ref": "pkg.mod:fn"} or {"kind": "onnx-graph", "graph": <b64 zlib>}
  harden.model    {"input_shape": [C,H,W], "num_classes": K}
  harden.recipe   the rewrites applied on top, in order (spectral norm, WCA noise, pruning masks)
  harden.data     what certification needs: dataset name, classes, input range, mean/std
  harden.source   the file this model came from: path, sha256, format
  harden.history  one record per training / pruning run
Loading rebuilds the plain module, re-applies the recipe (which creates the parametrization
buffers) and then loads the state dict, so nothing is ever unpickled. A bundle may come from
anyone, so every record is checked for the structure the loader relies on before it is used
(`parse_bundle_metadata`), sizes are bounded by what the file can hold, and a "factory"
architecture, which is the user's code, is imported only when the user names it (--arch) or
passes trust_code: never on the file's word alone.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import math
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from certify.common.errors import UserError, load_untrusted_json
from certify.common.files import atomic_path, sha256_file
from certify.onnx_import.metadata import MAX_CLASSES, check_harden_data, is_real, show

FORMAT_VERSION = "1"


@dataclass
class Bundle:
    module: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    arch: dict
    recipe: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        steps = ", ".join(step["step"] for step in self.recipe) or "no rewrites"
        return f"{self.arch.get('name', self.arch['kind'])} {list(self.input_shape)} -> {self.num_classes} classes ({steps})"


def encode_graph(onnx_bytes: bytes) -> str:
    return base64.b64encode(zlib.compress(onnx_bytes, 9)).decode("ascii")


def decode_graph(text: str, *, max_bytes: int = 1 << 31) -> bytes:
    """The ONNX bytes of a harden.arch graph; UserError when they are damaged or would unpack to
    more than `max_bytes` (a few compressed bytes can ask for gigabytes)."""
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
        unpacker = zlib.decompressobj()
        graph = unpacker.decompress(packed, max_bytes)
        if unpacker.unconsumed_tail or not unpacker.eof:
            raise ValueError("the graph is truncated or larger than the file can hold")
    except (ValueError, UnicodeEncodeError, binascii.Error, zlib.error) as exc:
        raise UserError(f"the ONNX graph recorded in the file's harden.arch is damaged ({exc})",
                        "re-create the file") from None
    return graph


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    """Write the bundle as one safetensors file, atomically."""
    path = Path(path)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in bundle.module.state_dict().items()}
    check_finite(state, what="the model to be saved")
    metadata = {
        "harden.format": FORMAT_VERSION,
        "harden.arch": json.dumps(bundle.arch),
        "harden.model": json.dumps({"input_shape": list(bundle.input_shape), "num_classes": bundle.num_classes}),
        "harden.recipe": json.dumps(bundle.recipe),
        "harden.data": json.dumps(bundle.data),
        "harden.source": json.dumps(bundle.source),
        "harden.history": json.dumps(bundle.history),
    }
    with atomic_path(path) as tmp:
        save_file(_untie_shared_tensors(state), str(tmp), metadata=metadata)
    return path


def _untie_shared_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (e.g. a tied weight); store copies.
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


# Bounds on what a file may ask us to build, so that a crafted shape cannot allocate terabytes.
MAX_INPUT_ELEMENTS = 1 << 24  # one sample: 16M values (64 MB as float32), e.g. 3 x 2048 x 2048
MAX_INPUT_RANK = 6
_MAX_HEADER = 100 * 1024 * 1024  # what the safetensors library itself accepts
_MAX_DEPTH = 64
_DAMAGED_HINT = "re-create the file"
_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def is_factory_ref(text: str) -> bool:
    """`package.module:function`, nothing else (no paths, no spaces)."""
    return bool(_REF.fullmatch(text))


def read_model_bytes(path: str | Path) -> bytes:
    """The whole model file, read once: every check and every parse then works on these bytes."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise UserError(f"model file {path} does not exist", "check the path") from None
        if exc.errno == errno.ELOOP:
            raise UserError(f"model file {path} is a symbolic link that loops", "give the real file") from None
        raise UserError(f"model file {path} cannot be read ({exc.strerror})", "check the path and its permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"model file {path} is a folder", "give the model file itself")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"model file {path} is not a regular file", "give a model file")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise UserError(f"model file {path} cannot be read ({exc.strerror or exc})",
                        "check its permissions") from None
    if not data:
        raise UserError(f"model file {path} is empty", "the file was not written completely; re-create it")
    return data


def safetensors_metadata(data: bytes, what: str) -> dict[str, str]:
    """The `__metadata__` of the safetensors file `data` ({} when it has none)."""
    def broken(detail: str) -> UserError:
        return UserError(f"{what} is not a readable safetensors file ({detail})",
                         "check that the file is complete; re-create it if it was truncated")

    if len(data) < 8:
        raise broken("shorter than its header")
    (size,) = struct.unpack("<Q", data[:8])
    if not 2 <= size <= min(_MAX_HEADER, len(data) - 8):
        raise broken(f"its header of {size} bytes does not fit in the file")
    try:
        header = load_untrusted_json(data[8:8 + size], "its header")
    except UserError as exc:
        raise broken(exc.what) from None
    if not isinstance(header, dict):
        raise broken("its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise broken("its metadata is not a map of strings")
    return metadata


def read_metadata(path: str | Path) -> dict[str, str] | None:
    """The harden metadata of a safetensors file, or None when it is a plain safetensors file."""
    metadata = safetensors_metadata(read_model_bytes(path), str(path))
    return metadata if "harden.format" in metadata else None


def load_tensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # SafetensorError, and whatever a crafted header makes the reader raise
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"{what} is not a readable safetensors file ({first})",
                        "check that the file is complete; re-create it if it was truncated") from None


def load_bundle(path: str | Path, *, arch: str | None = None, trust_code: bool = False) -> Bundle:
    """Rebuild a bundle written by `save_bundle`.

    A bundle whose architecture is a user factory (`package.module:function`) is rebuilt by
    importing and calling that function, which runs code: only when the user names the same
    factory (`arch`) or passes `trust_code`, never on the file's word alone."""
    path = Path(path)
    return bundle_from_bytes(read_model_bytes(path), path, arch=arch, trust_code=trust_code)


def bundle_from_bytes(data: bytes, path: Path, *, arch: str | None = None, trust_code: bool = False) -> Bundle:
    from harden.io.architecture import build_plain_module, resolve_arch
    from harden.io.recipe import apply_recipe

    metadata = safetensors_metadata(data, str(path))
    if "harden.format" not in metadata:
        raise UserError(f"{path} is a safetensors file without harden metadata",
                        "a bare state dict needs --arch package.module:factory (or a built-in name)")
    fields = parse_bundle_metadata(metadata, path, file_size=len(data))
    record = fields["arch"]
    if record["kind"] == "factory" and not trust_code:
        named = resolve_arch(arch) if arch is not None else None
        if named is None or named.get("ref") != record["ref"]:
            raise UserError(f"{path} records the architecture factory '{record['ref']}', and loading it would run "
                            "that code", f"pass --arch {record['ref']} if you trust it (or --trust-code)")
    state = load_tensors(data, str(path))
    check_finite(state, what=str(path))
    input_shape, num_classes = fields["input_shape"], fields["num_classes"]
    module = build_plain_module(record, input_shape, num_classes, max_elements=len(data))
    bundle = Bundle(module, input_shape, num_classes, record, [], fields["data"], fields["source"], fields["history"])
    try:
        apply_recipe(bundle, fields["recipe"])
    except UserError:
        raise
    except Exception as exc:  # a recipe that passed the checks above but does not fit this module
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"the rewrites recorded in {path} do not fit its architecture ({type(exc).__name__}: {first})",
                        "the file was edited or is damaged; re-create it") from None
    try:
        bundle.module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise UserError(f"the weights in {path} do not fit its recorded architecture ({first})",
                        "the file was edited or is damaged; re-create it") from None
    bundle.module.eval()
    return bundle


def parse_bundle_metadata(metadata: dict[str, str], path: str | Path, *, file_size: int) -> dict:
    """The harden.* records of a bundle, each checked for the structure the loader relies on.

    Returns arch, input_shape, num_classes, recipe, data, source, history; raises a one-line
    UserError naming the first damaged field."""
    def damaged(detail: str) -> UserError:
        return UserError(f"the harden metadata of {path} is damaged ({detail})", _DAMAGED_HINT)

    version = metadata.get("harden.format")
    if not isinstance(version, str):
        raise damaged("harden.format is missing")
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has harden format {version[:20]!r}, this tool reads {FORMAT_VERSION}",
                        "re-create the file with this version of harden")

    def document(key: str, default: str | None = None):
        raw = metadata.get(key, default)
        if raw is None:
            raise damaged(f"{key} is missing")
        try:
            value = load_untrusted_json(raw, key)
        except UserError as exc:
            raise damaged(exc.what) from None
        if not _printable_json(value, 0):
            raise damaged(f"{key} holds text that is not valid Unicode, or is nested too deeply")
        return value

    arch = check_arch_record(document("harden.arch"), damaged)
    model = document("harden.model")
    if not isinstance(model, dict):
        raise damaged("harden.model is not an object")
    if "input_shape" not in model or "num_classes" not in model:
        raise damaged("harden.model lacks input_shape or num_classes")
    input_shape = check_input_shape(model["input_shape"], damaged, "harden.model input_shape")
    num_classes = model["num_classes"]
    if not _integer(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise damaged(f"harden.model num_classes {show(num_classes)} is not a count of classes")
    recipe = check_recipe(document("harden.recipe", "[]"), damaged, file_size=file_size)
    data = check_data(document("harden.data", "{}"), damaged)
    source = document("harden.source", "{}")
    if not isinstance(source, dict):
        raise damaged("harden.source is not an object")
    history = document("harden.history", "[]")
    if not isinstance(history, list) or not all(isinstance(record, dict) for record in history):
        raise damaged("harden.history is not a list of records")
    for record in history:
        for key in ("run", "train", "norm"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise damaged(f"a harden.history record has {key} {show(record[key])}, not a name")
        if record.get("eps") is not None and not is_real(record["eps"]):
            raise damaged(f"a harden.history record has eps {show(record['eps'])}, not a number")
    return {"arch": arch, "input_shape": input_shape, "num_classes": int(num_classes), "recipe": recipe,
            "data": data, "source": source, "history": history}


def check_arch_record(arch, damaged) -> dict:
    from harden.io.zoo import ARCHITECTURES

    if not isinstance(arch, dict):
        raise damaged("harden.arch is not an object")
    kind = arch.get("kind")
    if arch.get("name") is not None and not (isinstance(arch["name"], str) and arch["name"].isprintable()):
        raise damaged("harden.arch name is not printable text")
    if kind == "zoo":
        if arch.get("name") not in ARCHITECTURES:
            raise damaged(f"harden.arch names the unknown built-in architecture {show(arch.get('name'))}")
    elif kind == "factory":
        if not isinstance(arch.get("ref"), str) or not is_factory_ref(arch["ref"]):
            raise damaged(f"harden.arch factory {show(arch.get('ref'))} is not package.module:function")
    elif kind == "onnx-graph":
        if not isinstance(arch.get("graph"), str):
            raise damaged("harden.arch holds no ONNX graph")
    else:
        raise damaged(f"harden.arch kind {show(kind)} is not zoo, factory or onnx-graph")
    return arch


def check_input_shape(shape, damaged, what: str) -> tuple[int, ...]:
    """A per-sample input shape: 1 to 6 positive sizes, at most MAX_INPUT_ELEMENTS values in all."""
    if not isinstance(shape, (list, tuple)) or not shape or not all(_integer(d) for d in shape):
        raise damaged(f"{what} {show(shape)} is not a list of sizes")
    if len(shape) > MAX_INPUT_RANK or any(d < 1 for d in shape):
        raise damaged(f"{what} {list(shape)} has a size below 1 or more than {MAX_INPUT_RANK} axes")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise damaged(f"{what} {list(shape)} has {math.prod(shape)} values per sample, more than the "
                      f"{MAX_INPUT_ELEMENTS} harden handles")
    return tuple(int(d) for d in shape)


def check_recipe(recipe, damaged, *, file_size: int) -> list[dict]:
    """What harden.io.recipe's handlers read from each step, checked before any of them runs."""
    if not isinstance(recipe, list) or len(recipe) > 100:
        raise damaged("harden.recipe is not a list of steps")
    for index, step in enumerate(recipe):
        where = f"harden.recipe step {index + 1}"
        if not isinstance(step, dict) or not isinstance(step.get("step"), str):
            raise damaged(f"{where} is not a {{'step': name, ...}} record")
        name = step["step"]
        if name == "spectral-norm":
            if not is_real(step.get("beta")) or not step["beta"] > 0:
                raise damaged(f"{where} (spectral-norm) has beta {show(step.get('beta'))}, not a positive number")
            layers = step.get("layers", ["conv", "linear"])
            if not isinstance(layers, list) or not layers or not all(kind in ("conv", "linear") for kind in layers):
                raise damaged(f"{where} (spectral-norm) has layers {show(layers)}, not a list of conv/linear")
            iterations = step.get("n_power_iterations", 1)
            if not _integer(iterations) or not 1 <= iterations <= 1_000_000:
                raise damaged(f"{where} (spectral-norm) has n_power_iterations {show(iterations)}")
        elif name == "wca":
            noise_dim = step.get("noise_dim")
            # The noise factor L is noise_dim x noise_dim and its values are in the file: a larger
            # noise_dim than the file can hold is damage, not something to allocate.
            if not _integer(noise_dim) or not 1 <= noise_dim or noise_dim * noise_dim > file_size:
                raise damaged(f"{where} (wca) has noise_dim {show(noise_dim)}, not a size that fits the file")
            if not isinstance(step.get("layer"), str) or not step["layer"]:
                raise damaged(f"{where} (wca) names no layer")
            if "init_std" in step and (not is_real(step["init_std"]) or not step["init_std"] > 0):
                raise damaged(f"{where} (wca) has init_std {show(step['init_std'])}, not a positive number")
        elif name == "prune":
            layers = step.get("layers")
            if not isinstance(layers, list) or not all(isinstance(layer, str) for layer in layers):
                raise damaged(f"{where} (prune) has layers {show(layers)}, not a list of layer names")
        # other names: harden.io.recipe.apply_recipe refuses them (a newer harden wrote the file)
    return recipe


def check_data(data, damaged) -> dict:
    """harden.data: what certification needs (dataset, classes, input range, normalization)."""
    data = check_harden_data(data, damaged)
    if data.get("input_shape") is not None:
        check_input_shape(data["input_shape"], damaged, "harden.data input_shape")
    return data


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _printable_json(value, depth: int) -> bool:
    # json.loads accepts lone surrogates ("\udcff"), which break printing and re-saving later.
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(_printable_json(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(_printable_json(key, depth + 1) and _printable_json(item, depth + 1) for key, item in value.items())
    return True


def check_finite(state: dict[str, torch.Tensor], *, what: str) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{what} has non-finite values (NaN or inf) in '{name}'",
                            "fix or retrain the model; harden cannot certify or harden it")


def file_source(path: str | Path, fmt: str, data: bytes | None = None) -> dict:
    """Where a model came from; `data` (the bytes already read) is hashed instead of the file,
    so the sha256 names exactly what was loaded."""
    path = Path(path)
    digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    return {"path": str(path), "sha256": digest, "format": fmt}
