"""Load a model for certification: ONNX files (ours or third-party), checked against onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from certify.common.errors import UserError
from certify.onnx_import.parity import check_against_onnxruntime
from certify.onnx_import.reader import import_onnx


@dataclass
class CertifiableModel:
    module: nn.Module
    input_shape: tuple[int, ...]
    metadata: dict[str, str]
    path: Path
    outputs: int = 0  # values per sample the model returns (logits, or the outputs Y_j of VNN-LIB)


def load_certifiable(path: str | Path) -> CertifiableModel:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"model {path} is a folder", "give the .onnx file")
    if not path.is_file():
        raise UserError(f"model file {path} does not exist", "check the path")
    if path.suffix.lower() != ".onnx":
        raise UserError(f"certify reads ONNX models, and {path.name} is not a .onnx file",
                        "export it first: harden export MODEL -o model.onnx")
    # The import's own onnxruntime check is skipped: the one below covers more points.
    imported = import_onnx(path, check=False)
    # The module we bound must compute what onnxruntime computes, or the certificate is about
    # another function. Check it on random points of the input range before any bound.
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(8, *imported.input_shape, generator=generator)
    check_against_onnxruntime(path, imported.module, probe)
    with torch.no_grad():
        outputs = int(imported.module.eval()(probe[:1]).shape[1])
    return CertifiableModel(imported.module.eval(), tuple(imported.input_shape), dict(imported.metadata), path,
                            outputs)
