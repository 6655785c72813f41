"""certify: measure robustness, change nothing. The data flow is the folder order: common ->
onnx_import (file -> torch module) -> specs (input boxes, VNN-LIB) -> bounds and attacks ->
verdicts (the cascade; dataset, radius and VNN-LIB drivers) -> reports -> cli."""

from certify.common.lazy import lazy_names

__getattr__ = lazy_names("certify", {
    "certify_model": "certify.verdicts.dataset",
    "certify_module": "certify.api",
    "check_properties": "certify.verdicts.vnnlib_check",
    "import_onnx": "certify.onnx_import.reader",
    "UserError": "certify.common.errors",
})
