"""Build the plain (un-rewritten) module that a bundle's `harden.arch` record describes.

A `package.module:function` factory is the user's own code: importing and calling it runs that
code. Whether a factory may be called is decided by the caller (`harden.io.bundle.bundle_from_bytes`
calls one only when the user named it with --arch or passed --trust-code); here it is called and
whatever it does wrong becomes a UserError.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import os
import re
import sys
import tempfile
import zlib

import torch
from torch import nn

from certify.common.errors import UserError
from harden.io.zoo import ARCHITECTURES

_FACTORY_HINT = "give --arch as package.module:function, importable from the current folder or PYTHONPATH"


def resolve_arch(name: str) -> dict:
    """`--arch` value -> arch record: a built-in name or `package.module:factory`."""

    if name in ARCHITECTURES:
        return {"kind": "zoo", "name": name}
    if ":" in name:
        if not is_factory_ref(name):
            raise UserError(f"--arch '{name}' is not package.module:function", _FACTORY_HINT)
        return {"kind": "factory", "ref": name, "name": name}
    raise UserError(f"unknown architecture '{name}'",
                    f"use one of {', '.join(ARCHITECTURES)} or package.module:factory")


def build_plain_module(arch: dict, input_shape: tuple[int, ...], num_classes: int, *,
                       max_elements: int | None = None) -> nn.Module:
    """The module `arch` describes. With `max_elements` (the size of the file its weights come
    from), a built-in architecture whose weights could not fit in that file is refused before
    anything is allocated."""
    kind = arch.get("kind")
    if kind == "zoo":
        name = arch.get("name")
        if name not in ARCHITECTURES:
            raise UserError(f"unknown built-in architecture '{name}'", f"use one of {', '.join(ARCHITECTURES)}")
        if len(input_shape) != 3:
            raise UserError(f"the built-in architecture {name} takes (C, H, W) inputs, not {list(input_shape)}",
                            "give --input-shape C,H,W")
        if max_elements is not None:
            with torch.device("meta"):
                sizes = sum(t.numel() for t in ARCHITECTURES[name](tuple(input_shape), num_classes).state_dict().values())
            if sizes > max_elements:
                raise UserError(f"{name} for inputs {list(input_shape)} and {num_classes} classes has {sizes} weights, "
                                "more than its file holds", "the file is damaged; re-create it")
        return ARCHITECTURES[name](tuple(input_shape), num_classes)
    if kind == "factory":
        return _call_factory(arch["ref"])
    if kind == "onnx-graph":
        from certify.onnx_import.reader import import_onnx
        from harden.io.architecture import decode_graph

        limit = 1 << 31 if max_elements is None else 4 * max_elements + (256 << 20)
        graph = decode_graph(arch["graph"], max_bytes=limit)
        # The importer reads files; the graph is small (weights come from the safetensors).
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "graph.onnx")
            with open(path, "wb") as handle:
                handle.write(graph)
            try:
                return import_onnx(path, check=False).module
            except UserError as error:  # name the record, not the temporary file
                raise UserError(error.what.replace(path, "the ONNX graph recorded in the file's harden.arch"),
                                "the file is damaged; re-create it") from None
    raise UserError(f"unknown architecture record {str(arch)[:100]}", "the file is damaged; re-create it")


def _call_factory(ref: str) -> nn.Module:
    module_name, _, attr = ref.partition(":")
    # `harden` run as a console script has its own folder first on sys.path, not the current one;
    # --arch mynet:make means ./mynet.py. Last, so that a stray file cannot shadow an installed package.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot import the architecture factory '{ref}' ({exc})", _FACTORY_HINT) from None
    except (Exception, SystemExit) as exc:  # the module's own code failed while importing
        raise UserError(f"importing the architecture factory '{ref}' failed ({_describe(exc)})",
                        "fix the module that defines it") from None
    if not callable(factory):
        raise UserError(f"the architecture factory '{ref}' is a {type(factory).__name__}, not a function",
                        "make it a function that returns the (untrained) model")
    try:
        model = factory()
    except (Exception, SystemExit) as exc:
        raise UserError(f"the architecture factory '{ref}' failed ({_describe(exc)})",
                        "fix it so that it returns the (untrained) model when called without arguments") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"the factory '{ref}' returned {type(model).__name__}, not a torch.nn.Module",
                        "make the factory return the (untrained) model")
    return model


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


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


_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def is_factory_ref(text: str) -> bool:
    """`package.module:function`, nothing else (no paths, no spaces)."""
    return bool(_REF.fullmatch(text))


