"""Outputs get the usual permissions: what the user's umask allows (0644 under umask 022), not the
private 0600 of a temporary file -- a bundle from `harden`, a JSON report from `harden inspect` and
from `certify`, each written through an atomic rename."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from certify.cli import app as certify_app
from harden.cli import app as harden_app
from harden.io.architecture import build_plain_module, resolve_arch
from harden.io.bundle import Bundle
from harden.io.bundle_file import save_bundle

SHAPE = (1, 4, 4)


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask-022", "umask-077", "umask-002"])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _bundle() -> Bundle:
    torch.manual_seed(0)
    record = resolve_arch("mlp")
    return Bundle(build_plain_module(record, SHAPE, 3), SHAPE, 3, record,
                  data={"classes": ["a", "b", "c"], "input_range": [0.0, 1.0]})


def test_a_written_bundle_follows_the_umask(tmp_path, umask):
    path = save_bundle(_bundle(), tmp_path / "model.safetensors")
    assert _mode(path) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no partial left behind


def test_an_inspect_report_follows_the_umask(tmp_path, umask):
    model = save_bundle(_bundle(), tmp_path / "model.safetensors")
    report = tmp_path / "inspect.json"
    result = CliRunner().invoke(harden_app, ["inspect", str(model), "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["lipschitz"]["l2_upper_bound"] > 0
    assert _mode(report) == 0o666 & ~umask


def test_a_certify_report_follows_the_umask(tmp_path, umask):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    onnx = tmp_path / "m.onnx"
    torch.onnx.export(module, torch.zeros(1, *SHAPE), str(onnx), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    x = np.random.default_rng(0).random((6, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        y = module(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(["a", "b", "c"]))
    report = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(certify_app, [str(onnx), "--data", str(tmp_path / "d.npz"), "--eps", "0.01",
                                              "--method", "ibp", "--no-attack", "--device", "cpu", "--quiet",
                                              "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())
    assert _mode(report) == 0o666 & ~umask
