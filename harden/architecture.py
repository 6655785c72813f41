"""Build the plain (un-rewritten) module that a bundle's `harden.arch` record describes."""

from __future__ import annotations

import importlib
import os
import tempfile

from torch import nn

from certify.errors import UserError
from harden.zoo import ARCHITECTURES


def resolve_arch(name: str) -> dict:
    """`--arch` value -> arch record: a built-in name or `package.module:factory`."""
    if name in ARCHITECTURES:
        return {"kind": "zoo", "name": name}
    if ":" in name:
        return {"kind": "factory", "ref": name, "name": name}
    raise UserError(f"unknown architecture '{name}'",
                    f"use one of {', '.join(ARCHITECTURES)} or package.module:factory")


def build_plain_module(arch: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    kind = arch.get("kind")
    if kind == "zoo":
        if arch["name"] not in ARCHITECTURES:
            raise UserError(f"unknown built-in architecture '{arch['name']}'",
                            f"use one of {', '.join(ARCHITECTURES)}")
        return ARCHITECTURES[arch["name"]](tuple(input_shape), num_classes)
    if kind == "factory":
        return _call_factory(arch["ref"])
    if kind == "onnx-graph":
        from harden.bundle import decode_graph
        from certify.onnx_import import import_onnx

        # The importer reads files; the graph is small (weights come from the safetensors).
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "graph.onnx")
            with open(path, "wb") as handle:
                handle.write(decode_graph(arch["graph"]))
            return import_onnx(path, check=False).module
    raise UserError(f"unknown architecture record {arch!r}", "the file is damaged; re-create it")


def _call_factory(ref: str) -> nn.Module:
    module_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot import the architecture factory '{ref}' ({exc})",
                        "give --arch as package.module:function, importable from the current folder or PYTHONPATH") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise UserError(f"the factory '{ref}' returned {type(model).__name__}, not a torch.nn.Module",
                        "make the factory return the (untrained) model")
    return model
