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
buffers) and then loads the state dict, so nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from certify.errors import UserError
from certify.files import atomic_path, sha256_file

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


def decode_graph(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text))


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


def read_metadata(path: str | Path) -> dict[str, str] | None:
    """The harden metadata of a safetensors file, or None when it is a plain safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc})",
                        "check that the file is complete; re-create it if it was truncated") from None
    return metadata if "harden.format" in metadata else None


def load_bundle(path: str | Path) -> Bundle:
    """Rebuild a bundle written by `save_bundle`."""
    from harden.recipe import apply_recipe
    from harden.architecture import build_plain_module

    path = Path(path)
    metadata = read_metadata(path)
    if metadata is None:
        raise UserError(f"{path} is a safetensors file without harden metadata",
                        "a bare state dict needs --arch package.module:factory (or a built-in name)")
    if metadata["harden.format"] != FORMAT_VERSION:
        raise UserError(f"{path} has harden format {metadata['harden.format']}, this tool reads {FORMAT_VERSION}",
                        "re-create the file with this version of harden")
    try:
        arch = json.loads(metadata["harden.arch"])
        model_info = json.loads(metadata["harden.model"])
        recipe = json.loads(metadata.get("harden.recipe", "[]"))
        data = json.loads(metadata.get("harden.data", "{}"))
        source = json.loads(metadata.get("harden.source", "{}"))
        history = json.loads(metadata.get("harden.history", "[]"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} has damaged harden metadata ({exc})", "re-create the file") from None
    input_shape = tuple(model_info["input_shape"])
    num_classes = int(model_info["num_classes"])
    module = build_plain_module(arch, input_shape, num_classes)
    bundle = Bundle(module, input_shape, num_classes, arch, [], data, source, history)
    apply_recipe(bundle, recipe)
    state = load_file(str(path))
    check_finite(state, what=str(path))
    try:
        bundle.module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
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


def file_source(path: str | Path, fmt: str) -> dict:
    path = Path(path)
    return {"path": str(path), "sha256": sha256_file(path), "format": fmt}
