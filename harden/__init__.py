"""harden: change models. The data flow is the folder order: io (read a model file into a Bundle)
-> layers (rewrites: spectral norm, WCA noise, pruning masks) -> training (fine-tuning) and pruning
-> io.export (ONNX). `harden/cli.py` is a thin layer over these."""

_API = {
    "load_model": "harden.io.loading",
    "save_bundle": "harden.io.bundle",
    "Bundle": "harden.io.bundle",
    "export_onnx": "harden.io.export",
}


def __getattr__(name: str):
    # Lazy, so that importing one sub-package does not import torch-heavy siblings.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'harden' has no attribute {name!r}")
