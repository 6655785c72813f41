"""The ONNX file's own outputs, by onnxruntime: what a certificate that names the file's sha256 is about.

One session per run. The dataset cascade compares every certified batch's clean logits with it,
and both the dataset cascade and the VNN-LIB checks confirm every counterexample on it before
reporting it: the imported module could differ from the file in the last bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from certify.attacks.gradient import margin
from certify.bounds.bounder import MarginBounder
from certify.common.progress import say
from certify.onnx_import.channel_affine import affine_ops_as_convs
from certify.onnx_import.parity import (check_against_onnxruntime,
                                        onnxruntime_logits,
                                        onnxruntime_session)
from certify.specs.input_spec import InputSpec, with_normalization


class _NormalizingSession:
    """An onnxruntime session that applies the --mean/--std map (put in front of the file's graph
    by the certified module) to its input first, so raw inputs can be fed to both."""

    def __init__(self, session, normalizer: nn.Module):
        self.session, self.normalizer = session, normalizer

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, names, feeds: dict):
        (name, value), = feeds.items()
        with torch.no_grad():
            device = self.normalizer.mean.device
            normalized = self.normalizer(torch.from_numpy(np.asarray(value)).to(device)).cpu().float().numpy()
        return self.session.run(names, {name: normalized})


class FileOutputs:
    def __init__(self, path: str | Path, normalizer: nn.Module | None = None, *, device: str = "cpu"):
        self.path = Path(path)
        session = onnxruntime_session(self.path, device=device)
        self.session = session if normalizer is None else _NormalizingSession(session, normalizer)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The file's outputs (float64, (n, outputs)) on raw inputs (n, *input_shape)."""
        return torch.from_numpy(onnxruntime_logits(self.session, x, path=self.path))

    def check(self, module: nn.Module, x: torch.Tensor) -> float:
        """Raise UserError unless the certified module computes the file's outputs on x."""
        return check_against_onnxruntime(self.path, module, x, session=self.session)

    def misclassified(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Which x the FILE misclassifies (a strictly larger other logit; non-finite outputs never count)."""
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool)
        logits = self.logits(x)
        return torch.isfinite(logits).all(1) & (margin(logits, labels.cpu()) > 0)


def certified_module(path: Path, model, spec: InputSpec, device: torch.device):
    """(the module certified: the file's graph behind the --mean/--std map, on `device`; its bounder;
    the file's own outputs by onnxruntime to check it against): one way for both modes."""
    normalized = with_normalization(model.module, spec, tuple(model.input_shape))
    normalizer = normalized[0] if normalized is not model.module else None
    module = affine_ops_as_convs(normalized, tuple(model.input_shape)).to(device)
    bounder = MarginBounder(module, tuple(model.input_shape), device=device)
    return module, bounder, FileOutputs(path, normalizer)


def warn_if_lipschitz_refused(bounder: MarginBounder, methods, name: str, *, quiet: bool) -> None:
    """One warning line when the cascade asks for the Lipschitz stage on a graph where the product
    rule does not hold (a residual add, say): the stage then decides nothing, and the user should know why."""
    if "lipschitz" in methods and bounder.lipschitz.refused is not None:
        say(f"warning: the lipschitz stage decides nothing on {name}: {bounder.lipschitz.refused}", quiet=quiet)
