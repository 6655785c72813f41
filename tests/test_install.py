"""Installing without the Makefile: `pip install .` into a bare virtualenv, then the documented
route for the one dependency pip cannot resolve (auto_LiRPA, through `harden setup`).

The slow test builds a real virtualenv with the torch the Makefile pins (pip's cache and this
machine's package configuration make that about a minute) and runs the installed console scripts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def makefile_torch_spec() -> str:
    """The torch requirement the Makefile installs (one place says which torch is tested)."""
    match = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile no longer sets TORCH_SPEC"
    return match.group(1)


def run(command: list, **options) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=900, **options)


def checked(command: list, **options) -> subprocess.CompletedProcess:
    finished = run(command, **options)
    assert finished.returncode == 0, f"{command} failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}"
    return finished


def test_setup_in_this_environment_checks_the_engine_and_prints_the_command():
    harden = [sys.executable, "-m", "harden"]
    shown = checked(harden + ["setup", "--print"]).stdout.strip()
    assert shown == f"{sys.executable} -m pip install --no-deps auto-LiRPA==0.3"
    finished = checked(harden + ["setup"])
    assert "installing" not in finished.stderr  # already installed: pip does not run again
    assert re.search(r"auto_LiRPA 0\.3 works \(IBP and CROWN checked", finished.stderr)


def random_mnist_onnx(path: Path) -> Path:
    """An untrained MLP for MNIST, exported with harden's metadata: enough for certify to run."""
    from harden.io.architecture import build_plain_module
    from harden.io.bundle import Bundle
    from harden.io.export import export_onnx

    torch.manual_seed(0)
    record = {"kind": "zoo", "name": "mlp"}
    bundle = Bundle(build_plain_module(record, (1, 28, 28), 10), (1, 28, 28), 10, record,
                    data={"dataset": "mnist", "input_range": [0.0, 1.0]})
    export_onnx(bundle, path)
    return path


@pytest.fixture(scope="module")
def bare_install(tmp_path_factory):
    """A fresh virtualenv with the Makefile's torch and then `pip install .` of a copy of the sources
    (a copy, so the build writes nothing into the working tree)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("harden", "certify"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    checked([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    checked([python, "-m", "pip", "install", "-q", makefile_torch_spec()])
    torch_before = checked([python, "-c", "import torch; print(torch.__version__)"]).stdout.strip()
    checked([python, "-m", "pip", "install", "-q", source])
    return venv, torch_before, random_mnist_onnx(root / "model.onnx")


@pytest.mark.slow
def test_pip_install_then_the_one_line_hint_then_setup_then_certify(bare_install, tmp_path):
    venv, torch_before, model = bare_install
    python, certify, harden = (venv / "bin" / name for name in ("python", "certify", "harden"))
    # pip install . leaves the torch that was there (no CUDA build pulled in) and no auto_LiRPA.
    assert checked([python, "-c", "import torch; print(torch.__version__)"]).stdout.strip() == torch_before
    assert run([python, "-c", "import auto_LiRPA"]).returncode != 0

    before = run([certify, model, "--eps", "0.1", "--limit", "10"], cwd=tmp_path)
    assert before.returncode == 2 and before.stdout == ""
    lines = before.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: auto_LiRPA")
    command = checked([harden, "setup", "--print"]).stdout.strip()
    assert f"run: {command} " in lines[0] and command.startswith(f"{python} -m pip install --no-deps")

    setup = checked([harden, "setup"], cwd=tmp_path)
    assert "installing the bound engine" in setup.stderr and "works (IBP and CROWN checked" in setup.stderr

    report = tmp_path / "report.json"
    checked([certify, model, "--eps", "0.1", "--limit", "10", "--json", report], cwd=tmp_path)
    document = json.loads(report.read_text())
    assert document["results"][0]["samples"] == 10
    assert document["tools"]["auto_LiRPA"] == "0.3" and document["tools"]["torch"] == torch_before


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the whole check")
def test_gpu_check_without_a_gpu_stops_with_one_line(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    environment = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    finished = run(["bash", script, "--wheels", tmp_path], env=environment)
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.strip().splitlines() == [
        "error: no GPU: torch.cuda.is_available() is False on this machine -- run it where CUDA works, or give --cpu-dry-run"]
    assert not (tmp_path / "gpu_check.json").exists()
