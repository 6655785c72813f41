"""ONNX export with the certification metadata and a parity check against onnxruntime.

We use torch's TorchScript-based exporter (`dynamo=False`, opset 17): it needs no extra package,
writes plain Gemm/Conv/Relu graphs that our importer and auto_LiRPA read, and keeps the batch axis
dynamic. The dynamo exporter needs onnxscript and writes opset 18+, which adds nothing for these
classifiers.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from certify.common.errors import UserError
from certify.common.files import atomic_path
from certify.onnx_import.parity import onnxruntime_logits, onnxruntime_session
from certify.specs.input_spec import check_normalization
from harden.io.bundle import Bundle

OPSET = 17
# Parity: every logit must satisfy |onnx - torch| <= ATOL + RTOL * |torch|, and argmax must agree.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4


def module_to_onnx_bytes(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    dummy = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        # The legacy exporter is our choice (see the module docstring): torch's notices that it is
        # deprecated, and the tracer's notes on Python values it records as constants (the layers'
        # shapes), say nothing the user can act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (dummy,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def baked_module(module: nn.Module, *, deterministic: bool = True) -> nn.Module:
    """A copy with every parametrization (spectral norm, pruning masks) replaced by its value, in eval
    mode, each BatchNorm that follows a conv/linear folded into it."""
    from harden.layers.spectral import bake, fold_batchnorm

    module = bake(independent_copy(module))
    for layer in module.modules():
        if parametrize.is_parametrized(layer):
            for name in list(layer.parametrizations.keys()):
                parametrize.remove_parametrizations(layer, name, leave_parametrized=True)
    if deterministic:
        _set_noise(module, enabled=False)
    # A BatchNorm right after a conv/linear (certified training's BatchNorm nets) becomes part of
    # that layer: the file certify reads is then plain convs and dense layers.
    return fold_batchnorm(module.eval())


def independent_copy(module: nn.Module) -> nn.Module:
    """copy.deepcopy, with each parametrized layer given a class of its own.

    torch.nn.utils.parametrize makes one class per parametrized layer (holding the `weight`
    property), and a deep copy shares that class with the original; removing a parametrization
    from the copy then deletes the property from the shared class and breaks the original."""
    copied = copy.deepcopy(module)
    for layer in copied.modules():
        if parametrize.is_parametrized(layer):
            cls = layer.__class__
            layer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return copied


def _set_noise(module: nn.Module, *, enabled: bool) -> None:
    for layer in module.modules():
        if hasattr(layer, "noise_enabled"):
            layer.noise_enabled = enabled


def certification_metadata(bundle: Bundle) -> dict[str, str]:
    data = dict(bundle.data)
    data.setdefault("input_range", [0.0, 1.0])
    data.setdefault("input_shape", list(bundle.input_shape))
    data.setdefault("classes", [str(k) for k in range(bundle.num_classes)])
    return {
        "harden.data": json.dumps(data),
        "harden.recipe": json.dumps(bundle.recipe),
        "harden.source": json.dumps(bundle.source),
    }


def export_onnx(bundle: Bundle, output: str | Path, *, deterministic: bool = True,
                parity_inputs: torch.Tensor | None = None) -> dict:
    """Write `bundle` as ONNX at `output`; returns the parity-check record. No file on failure."""
    import onnx

    output = Path(output)
    check_normalization(bundle.data.get("mean"), bundle.data.get("std"), tuple(bundle.input_shape))
    module = baked_module(bundle.module, deterministic=deterministic)
    model = onnx.load_from_string(module_to_onnx_bytes(module, bundle.input_shape))
    metadata = certification_metadata(bundle)
    if any(step.get("step") == "wca" for step in bundle.recipe):
        # Certificates of a deterministic export hold for the mean network, not the random one.
        metadata["harden.noise"] = json.dumps(
            {"layer": "wca", "exported": "mean network (noise off)" if deterministic else "stochastic (noise on)"})
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    inputs = parity_inputs if parity_inputs is not None else _parity_inputs(bundle)
    with atomic_path(output) as tmp:
        onnx.save(model, str(tmp))
        parity = check_parity(module, tmp, inputs) if deterministic else _check_runs(tmp, inputs)
    return parity


def _parity_inputs(bundle: Bundle) -> torch.Tensor:
    """Real inputs where the dataset is known, random points of the input range otherwise."""
    name = bundle.data.get("dataset")
    if name:
        from certify.data.datasets import load_dataset

        try:
            return load_dataset(name, split="test").x[:64]
        except UserError:
            pass
    low, high = bundle.data.get("input_range", [0.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    return low + (high - low) * torch.rand(64, *bundle.input_shape, generator=generator)


def check_parity(module: nn.Module, onnx_path: str | Path, inputs: torch.Tensor) -> dict:
    session = onnxruntime_session(onnx_path, device="cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        expected = module(inputs.float()).numpy()
    got = onnxruntime_logits(session, inputs, path=onnx_path)
    error = np.abs(got - expected)
    allowed = PARITY_ATOL + PARITY_RTOL * np.abs(expected)
    same_argmax = bool((got.argmax(1) == expected.argmax(1)).all())
    if not (error <= allowed).all() or not same_argmax:
        raise UserError(f"ONNX export disagrees with the torch model (max |diff| {error.max():.3g}, "
                        f"tolerance {PARITY_ATOL:g} + {PARITY_RTOL:g}*|logit|)",
                        "report this with the model; the export was not written")
    return {"samples": int(inputs.shape[0]), "max_abs_diff": float(error.max()),
            "atol": PARITY_ATOL, "rtol": PARITY_RTOL}


def _check_runs(onnx_path: str | Path, inputs: torch.Tensor) -> dict:
    # A stochastic export cannot match torch draw for draw; it must run and give finite logits.
    session = onnxruntime_session(onnx_path)
    got = onnxruntime_logits(session, inputs, path=onnx_path)
    if not np.isfinite(got).all() or got.shape[0] != inputs.shape[0]:
        raise UserError("the stochastic ONNX export does not run correctly in onnxruntime",
                        "report this with the model; the export was not written")
    return {"samples": int(inputs.shape[0]), "stochastic": True}
