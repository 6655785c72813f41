"""A bundle on disk: ONE safetensors file, the tensors plus harden.* JSON metadata (see harden.io.bundle). Reading never unpickles; every record is checked (harden.io.bundle_checks) before it is used."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from certify.common.errors import UserError, load_untrusted_json
from certify.common.files import atomic_path, sha256_file
from harden.io.bundle import FORMAT_VERSION, Bundle
from harden.io.bundle_checks import parse_bundle_metadata


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


_MAX_HEADER = 100 * 1024 * 1024  # what the safetensors library itself accepts


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


