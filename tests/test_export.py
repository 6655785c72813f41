"""ONNX export: valid graph, dynamic batch, certification metadata, parity enforced."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from certify.common.errors import UserError
from harden.io.bundle import Bundle
from harden.io.bundle_file import save_bundle
from harden.io.export import PARITY_ATOL, export_onnx
from harden.io.zoo import mlp


def test_export_runs_in_onnxruntime_with_metadata(tmp_path, trained_small_cnn, mnist_test):
    bundle = copy.deepcopy(trained_small_cnn)
    path = tmp_path / "model.onnx"
    parity = export_onnx(bundle, path)
    assert parity["max_abs_diff"] <= PARITY_ATOL
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    data = json.loads(meta["harden.data"])
    assert data["dataset"] == "mnist" and data["input_range"] == [0.0, 1.0]
    assert data["classes"] == [str(k) for k in range(10)] and data["input_shape"] == [1, 28, 28]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 64):  # the batch axis is dynamic
        x = mnist_test.x[:batch].numpy()
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            expected = bundle.module(mnist_test.x[:batch]).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


class BranchesOnInput(nn.Module):
    """Python control flow on the input: tracing freezes one branch, so the export is wrong on the other."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        if x.sum() > 0:
            return self.net(x)
        return -self.net(x)


def test_parity_failure_leaves_no_file(tmp_path, mnist_test):
    bundle = Bundle(BranchesOnInput().eval(), (1, 28, 28), 10, {"kind": "factory", "ref": "test"})
    path = tmp_path / "model.onnx"
    with pytest.raises(UserError, match="disagrees"):
        export_onnx(bundle, path, parity_inputs=mnist_test.x[:16])
    assert list(tmp_path.iterdir()) == []


def test_export_cli_and_errors(tmp_path, trained_small_cnn):
    model = save_bundle(copy.deepcopy(trained_small_cnn), tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    ok = subprocess.run([sys.executable, "-m", "harden", "export", str(model), "-o", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "parity" in ok.stderr and out.exists()
    same = subprocess.run([sys.executable, "-m", "harden", "export", str(out), "-o", str(out)],
                          capture_output=True, text=True)
    assert same.returncode == 2 and "also an input" in same.stderr
    wrong = subprocess.run([sys.executable, "-m", "harden", "export", str(model), "-o", str(model)],
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "written as .onnx" in wrong.stderr
    missing = subprocess.run([sys.executable, "-m", "harden", "export", str(tmp_path / "nope.pt"), "-o",
                              str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
