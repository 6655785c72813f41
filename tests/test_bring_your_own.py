"""A user's own classifier through the README path, by the command lines: convert -> finetune (PGD,
then IBP) -> prune -> export -> certify -> inspect. One small model per kind of standard layer,
trained briefly on real MNIST; each works end to end, or is refused in one line that says what to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from certify.cli import app as certify_app
from harden.cli import app as harden_app

ROOT = Path(__file__).resolve().parents[1]
HARDEN = ROOT / ".venv" / "bin" / "harden"

# Each factory is the whole user file `mynet.py`: `make()` returns the untrained model.
MODELS = {
    "conv_bn_maxpool": """
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 10))""",
    "residual": """
        Residual()""",
    "adaptive_pool_dropout": """
        nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(7),
                      nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * 7 * 7, 10))""",
    "mlp_tanh": "mlp(nn.Tanh)",
    "mlp_silu": "mlp(nn.SiLU)",
    "mlp_elu": "mlp(nn.ELU)",
    "mlp_gelu": "mlp(nn.GELU)",
    "normalizes_inside": """
        Normalized()""",
}

PRELUDE = """
import torch
from torch import nn


def mlp(activation):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), activation(), nn.Linear(32, 10))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.inner = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.inner(h))


class Normalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.1307))
        self.register_buffer("std", torch.tensor(0.3081))
        self.net = mlp(nn.ReLU)

    def forward(self, x):
        return self.net((x - self.mean) / self.std)
"""


def write_user_model(folder: Path, kind: str) -> Path:
    """`mynet.py` with make() for `kind`, and its freshly initialised weights as a state dict."""
    source = PRELUDE + f"\n\ndef make():\n    torch.manual_seed(0)\n    return {textwrap.dedent(MODELS[kind]).strip()}\n"
    (folder / "mynet.py").write_text(source)
    namespace: dict = {}
    exec(compile(source, str(folder / "mynet.py"), "exec"), namespace)
    weights = folder / "weights.pt"
    torch.save(namespace["make"]().state_dict(), weights)
    return weights


def in_folder(folder: Path, monkeypatch) -> None:
    """Work in `folder` as a user would: its mynet.py is the one imported, as in a fresh process."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "mynet", raising=False)


def invoke(app, args: list[str]):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


TRAIN = ["--data", "mnist", "--limit", "1000", "--eval-limit", "50", "--batch-size", "50", "--lr", "0.01", "--quiet"]


def readme_path(folder: Path, kind: str) -> dict:
    """Run the README path on the user's model in `folder` (the current folder); stop at the first
    step that fails and return what each step said."""
    weights = write_user_model(folder, kind)
    steps = [
        (harden_app, ["convert", str(weights), "--arch", "mynet:make", "--input-shape", "1,28,28",
                      "-o", "hard.safetensors"]),
        (harden_app, ["finetune", "hard.safetensors", "--train", "pgd", "--eps", "0.05", "--steps", "2",
                      *TRAIN, "--trust-code", "-o", "pgd.safetensors"]),
        (harden_app, ["finetune", "pgd.safetensors", "--train", "ibp", "--eps", "0.02", *TRAIN,
                      "--trust-code", "-o", "ibp.safetensors"]),
        (harden_app, ["prune", "ibp.safetensors", "--sparsity", "0.5", "--schedule", "oneshot", "--epochs", "1",
                      "--train", "clean", *TRAIN[:2], "--limit", "200", *TRAIN[4:], "--trust-code",
                      "-o", "pruned.safetensors"]),
        (harden_app, ["export", "pruned.safetensors", "--trust-code", "-o", "model.onnx"]),
        (certify_app, ["model.onnx", "--eps", "0.01", "--limit", "10", "--attack-steps", "5", "--quiet",
                       "--json", "report.json"]),
        (harden_app, ["inspect", "model.onnx", "--json", "inspect.json"]),
    ]
    said = {}
    for app, args in steps:
        code, output = invoke(app, args)
        said[args[0]] = (code, output)
        if code != 0:
            break
    return said


@pytest.mark.parametrize("kind", list(MODELS))
def test_readme_path_works(kind, tmp_path, monkeypatch):
    in_folder(tmp_path, monkeypatch)
    said = readme_path(tmp_path, kind)
    failed = {step: output for step, (code, output) in said.items() if code != 0}
    assert not failed, failed
    report = json.loads((tmp_path / "report.json").read_text())
    (result,) = report["results"]
    assert result["samples"] == 10 and result["clean_accuracy"] > 0.5, result
    assert json.loads((tmp_path / "inspect.json").read_text())



def briefly_trained(kind: str, folder: Path, mnist_train) -> torch.nn.Module:
    """The user's model after a few clean steps on real MNIST (enough to classify most images)."""
    write_user_model(folder, kind)
    namespace: dict = {}
    exec(compile((folder / "mynet.py").read_text(), "mynet.py", "exec"), namespace)
    model = namespace["make"]()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        rows = torch.randint(0, 5000, (50,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(mnist_train.x[rows].reshape(-1, 1, 28, 28)), mnist_train.y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("kind, opset, external", [("conv_bn_maxpool", 18, True), ("mlp_gelu", 20, False),
                                                   ("residual", 18, False)])
def test_dynamo_export_certifies(kind, opset, external, tmp_path, mnist_train):
    pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript")
    model = briefly_trained(kind, tmp_path, mnist_train)
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():  # the exporter's own FutureWarnings about torch internals
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(model, (torch.rand(1, 1, 28, 28),), str(path), dynamo=True, opset_version=opset,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=external)
    assert (tmp_path / "dynamo.onnx.data").exists() == external
    code, output = invoke(certify_app, [str(path), "--data", "mnist", "--eps", "0.005", "--eps", "0.05",
                                        "--limit", "20", "--attack-steps", "5", "--quiet", "--json",
                                        str(tmp_path / "report.json")])
    assert code == 0, output
    results = json.loads((tmp_path / "report.json").read_text())["results"]
    assert results[0]["clean_accuracy"] > 0.5, results[0]
    assert results[0]["verified"] > 0, results[0]  # the bounds do reach the end of the graph
    for result in results:
        assert result["verified"] + result["falsified"] + result["unknown"] == 20


def test_arch_factory_from_the_current_folder_with_the_console_script(tmp_path):
    """`--arch mynet:make` means ./mynet.py for the installed `harden` too, whose sys.path starts at
    its own folder rather than the current one."""
    weights = write_user_model(tmp_path, "mlp_tanh")
    environment = {**os.environ, "PYTHONPATH": ""}
    convert = subprocess.run([str(HARDEN), "convert", str(weights), "--arch", "mynet:make", "--input-shape", "1,28,28",
                              "-o", "hard.safetensors"], cwd=tmp_path, env=environment,
                             capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr
    export = subprocess.run([str(HARDEN), "export", "hard.safetensors", "--trust-code", "-o", "model.onnx"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    assert (tmp_path / "model.onnx").stat().st_size > 0
    # Elsewhere the factory cannot be found: one line that says where it is looked for.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = subprocess.run([str(HARDEN), "export", str(tmp_path / "hard.safetensors"), "--trust-code", "-o", "m.onnx"],
                           cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=300)
    assert moved.returncode == 2
    assert moved.stderr.strip().count("\n") == 0 and "current folder" in moved.stderr, moved.stderr
