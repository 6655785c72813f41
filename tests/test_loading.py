"""Model loading: every accepted format gives the same function; bad files give one clear error."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from certify.common.errors import UserError
from harden.io.bundle import Bundle
from harden.io.bundle_file import load_bundle, save_bundle
from harden.io.export import module_to_onnx_bytes
from harden.io.loading import detect_format, load_model
from harden.io.zoo import small_cnn

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    module = small_cnn().eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        y = module(x)
    return module, x, y


def _same_function(bundle: Bundle, x, y, atol=1e-5):
    with torch.no_grad():
        got = bundle.module(x)
    assert got.shape == y.shape
    assert torch.allclose(got, y, atol=atol), (got - y).abs().max()


def test_state_dict_needs_arch_then_loads(tmp_path, reference):
    module, x, y = reference
    path = tmp_path / "weights.pt"
    torch.save(module.state_dict(), path)
    assert detect_format(path) == "torch-pickle"
    with pytest.raises(UserError, match="--arch"):
        load_model(path)
    bundle = load_model(path, arch="small-cnn")
    assert bundle.num_classes == 10 and bundle.input_shape == (1, 28, 28)
    _same_function(bundle, x, y)
    with pytest.raises(UserError, match="do not fit"):
        load_model(path, arch="mlp")


def test_bare_safetensors_with_arch(tmp_path, reference):
    module, x, y = reference
    path = tmp_path / "weights.safetensors"
    save_file(module.state_dict(), str(path))
    _same_function(load_model(path, arch="small-cnn"), x, y)


def test_user_factory_arch(tmp_path, reference, monkeypatch):
    module, x, y = reference
    (tmp_path / "my_arch.py").write_text(
        "from harden.io.zoo import small_cnn\n\ndef build():\n    return small_cnn()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "weights.pt"
    torch.save(module.state_dict(), path)
    bundle = load_model(path, arch="my_arch:build")
    assert bundle.arch == {"kind": "factory", "ref": "my_arch:build", "name": "my_arch:build"}
    _same_function(bundle, x, y)
    with pytest.raises(UserError, match="cannot import"):
        load_model(path, arch="no_such_module_xyz:build")


def test_torchscript_goes_through_onnx_into_standard_layers(tmp_path, reference):
    module, x, y = reference
    path = tmp_path / "model.pt"
    torch.jit.trace(module, x[:1]).save(str(path))
    assert detect_format(path) == "torchscript"
    bundle = load_model(path)
    _same_function(bundle, x, y)
    kinds = {type(m) for m in bundle.module.modules()}
    assert nn.Conv2d in kinds and nn.Linear in kinds  # editable, so the rewrites can see the layers


def test_torch_export_program(tmp_path, reference):
    module, x, y = reference
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(module, (x[:2],)), str(path))
    assert detect_format(path) == "pt2"
    bundle = load_model(path)
    assert bundle.input_shape == (1, 28, 28)
    _same_function(bundle, x, y)


def test_onnx(tmp_path, reference):
    module, x, y = reference
    path = tmp_path / "model.onnx"
    path.write_bytes(module_to_onnx_bytes(module, (1, 28, 28)))
    assert detect_format(path) == "onnx"
    _same_function(load_model(path), x, y)


def test_bundle_round_trip_keeps_metadata(tmp_path, reference):
    module, x, y = reference
    bundle = Bundle(copy.deepcopy(module), (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"},
                    data={"dataset": "mnist"}, history=[{"run": "test"}])
    path = save_bundle(bundle, tmp_path / "m.safetensors")
    again = load_model(path)
    assert again.data == {"dataset": "mnist"} and again.history == [{"run": "test"}]
    _same_function(again, x, y)
    # an ONNX-imported model also round-trips through a bundle (its graph is stored in the metadata)
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(module_to_onnx_bytes(module, (1, 28, 28)))
    imported = load_model(onnx_path)
    save_bundle(imported, tmp_path / "imported.safetensors")
    _same_function(load_bundle(tmp_path / "imported.safetensors"), x, y)


class _WritesAFile:
    """Unpickling this object would create a file: proof of code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _WritesAFile(str(marker))}, path)
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(path)
    assert not marker.exists()
    # the same refusal through the command line: one line, exit code 2, no traceback
    result = subprocess.run([sys.executable, "-m", "harden", "convert", str(path), "-o", str(tmp_path / "o.safetensors")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "trust-pickle" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_trusted_pickled_module(tmp_path, reference):
    module, x, y = reference
    path = tmp_path / "full.pt"
    torch.save(module, path)
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(path)
    _same_function(load_model(path, trust_pickle=True), x, y)


def test_truncated_and_random_files(tmp_path, reference):
    module, _, _ = reference
    good = tmp_path / "good.pt"
    torch.jit.trace(module, torch.zeros(1, 1, 28, 28)).save(str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    bundle_path = save_bundle(Bundle(module, (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"}),
                              tmp_path / "b.safetensors")
    cut_bundle = tmp_path / "cut.safetensors"
    cut_bundle.write_bytes(bundle_path.read_bytes()[:-1000])
    for path in (truncated, junk, cut_bundle):
        with pytest.raises(UserError) as info:
            load_model(path)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_output_must_be_batch_by_classes(tmp_path):
    path = tmp_path / "image_out.pt"
    torch.jit.trace(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1)), torch.zeros(1, 1, 28, 28)).save(str(path))
    with pytest.raises(UserError, match=r"not \((batch, )?classes"):
        load_model(path)


def test_non_finite_weights(tmp_path, reference):
    module, _, _ = reference
    broken = copy.deepcopy(module)
    with torch.no_grad():
        broken[0].weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(broken.state_dict(), path)
    with pytest.raises(UserError, match="non-finite"):
        load_model(path, arch="small-cnn")
    traced = tmp_path / "inf.pt"
    with torch.no_grad():
        broken[0].weight[0, 0, 0, 0] = float("inf")
    torch.jit.trace(broken, torch.zeros(1, 1, 28, 28)).save(str(traced))
    with pytest.raises(UserError, match="non-finite|NaN|inf"):
        load_model(traced)


def test_wrong_input_shape_is_explained(tmp_path, reference):
    module, _, _ = reference
    path = tmp_path / "w.pt"
    torch.save(module.state_dict(), path)
    with pytest.raises(UserError, match="input-shape|do not fit"):
        load_model(path, arch="small-cnn", input_shape=(3, 32, 32))
