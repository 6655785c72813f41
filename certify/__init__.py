"""certify: measure robustness, change nothing. The data flow is the folder order: common ->
onnx_import (file -> torch module) -> specs (input boxes, VNN-LIB) -> bounds and attacks ->
verdicts (the cascade; dataset, radius and VNN-LIB drivers) -> reports -> cli."""

_API = {
    "certify_model": "certify.verdicts.dataset",
    "check_properties": "certify.verdicts.vnnlib_check",
    "import_onnx": "certify.onnx_import.reader",
    "UserError": "certify.common.errors",
}


def __getattr__(name: str):
    # Lazy, so that the command line starts without importing torch-heavy modules it does not use.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'certify' has no attribute {name!r}")
