"""The imported module must compute what onnxruntime computes on the file itself, or a certificate
would be about another function. One onnxruntime session factory and one comparison for every
caller: the importer's check, export parity, per-batch checks and counterexample confirmation.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from certify.common.errors import UserError


def onnxruntime_session(path: str | os.PathLike, *, device: str = "cpu"):
    """An onnxruntime session that does not log: its C++ logger writes to stderr on its own, which
    would break the one-line errors (the exception carries the message anyway). CUDA where asked
    for and present; asking for it elsewhere makes onnxruntime print a loud error."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # fatal only
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types
        raise UserError(f"onnxruntime cannot load {path}: {error}".splitlines()[0],
                        "check that the file is a valid ONNX model") from error


def onnxruntime_logits(session, inputs: torch.Tensor, *, path: str | os.PathLike = "the model") -> np.ndarray:
    """Outputs of `session` on `inputs` (N, *input_shape) as a float64 (N, outputs) array. A graph
    may take a fixed batch (often 1) or no batch axis at all: it is fed what it takes."""
    inputs = inputs.detach().float().cpu()
    declared = session.get_inputs()[0]
    if len(declared.shape) == inputs.dim() - 1:
        chunks = [x.numpy() for x in inputs]
        sizes = [1] * len(chunks)
    else:
        step = declared.shape[0] if isinstance(declared.shape[0], int) and declared.shape[0] > 0 \
            else max(len(inputs), 1)
        chunks = [_pad_batch(inputs[i:i + step], step) for i in range(0, len(inputs), step)]
        sizes = [len(chunk) for chunk in chunks]
    try:
        outputs = [session.run(None, {declared.name: chunk})[0] for chunk in chunks]
    except Exception as error:
        raise UserError(f"onnxruntime cannot run {path} on inputs of shape {tuple(inputs.shape)}: "
                        f"{error}".splitlines()[0], "pass inputs of the model's per-sample shape") from error
    reference = np.concatenate([out.reshape(size, -1) for out, size in zip(outputs, sizes)])
    return reference[: len(inputs)].astype(np.float64)


def check_against_onnxruntime(path: str | os.PathLike, module: torch.nn.Module, inputs: torch.Tensor,
                              *, atol: float = 1e-4, rtol: float = 1e-4, session=None) -> float:
    """Run `inputs` (N, *input_shape) through `module` and through onnxruntime; return the largest
    absolute difference, or raise UserError when they differ beyond atol + rtol * |ref|."""
    if session is None:
        session = onnxruntime_session(path)
    inputs = inputs.detach().float().cpu()
    reference = onnxruntime_logits(session, inputs, path=path)
    device = next(iter([*module.parameters(), *module.buffers()]), inputs).device
    with torch.no_grad():
        ours = module(inputs.to(device)).double().cpu().numpy().reshape(len(inputs), -1)
    if ours.shape != reference.shape:
        raise UserError(f"imported module of {path} gives outputs of shape {ours.shape}, onnxruntime "
                        f"{reference.shape}",
                        "the module does not match this ONNX file")
    if not np.all(np.isfinite(reference)):
        raise UserError(f"{path} computes NaN or infinite outputs on inputs of its input range (onnxruntime)",
                        "fix the model (a division by zero, overflowing weights); certify bounds finite functions")
    diff = float(np.max(np.abs(ours - reference))) if ours.size else 0.0
    if not np.allclose(ours, reference, atol=atol, rtol=rtol) or not np.isfinite(diff):
        raise UserError(
            f"imported module of {path} differs from onnxruntime by up to {diff:.3g}",
            "the module and the ONNX file compute different functions",
        )
    return diff


def _pad_batch(chunk: torch.Tensor, size: int) -> np.ndarray:
    # A graph with a fixed batch > 1 needs full chunks; repeat the last sample (its outputs are cut).
    if len(chunk) < size:
        chunk = torch.cat([chunk, chunk[-1:].expand(size - len(chunk), *chunk.shape[1:])])
    return chunk.numpy()
