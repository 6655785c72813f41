"""harden: change models. The data flow is the folder order: io (read a model file into a Bundle)
-> layers (rewrites: spectral norm, WCA noise, pruning masks) -> training (fine-tuning) and pruning
-> io.export (ONNX). `harden/cli.py` is a thin layer over these."""

from certify.common.lazy import lazy_names

__getattr__ = lazy_names("harden", {
    "load_model": "harden.io.loading",
    "save_bundle": "harden.io.bundle_file",
    "Bundle": "harden.io.bundle",
    "export_onnx": "harden.io.export",
    "spectral_normalize": "harden.api",
    "finetune": "harden.api",
    "prune": "harden.api",
    "export_module": "harden.api",
})
