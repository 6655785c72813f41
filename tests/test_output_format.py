"""What both command lines print, and where: no library warnings, readable progress lines when stderr
is not a terminal, result tables on stdout, pure JSON with `--json -`, flags without a `<bool>` type in
--help, and a default output name that is never overwritten silently.

The runs are real `python -W default -m harden|certify` processes on a tiny 8x8 .npz (train, convert,
finetune --train ibp, export, certify), so every warning torch, auto_LiRPA or onnxruntime raises on
the way would reach the captured stderr.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from certify.cli import app as certify_app
from certify.common.progress import LINE_EVERY_S, LineProgress, progress_bar
from harden.cli import app as harden_app

ROOT = Path(__file__).resolve().parents[1]
HARDEN_COMMANDS = ("train", "convert", "finetune", "export", "inspect", "prune")


def run(program: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """One real process, with stdout and stderr apart; `-W default` shows every warning once."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-W", "default", "-m", program, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The README's main path on tiny real data; each step's finished process, by name."""
    folder = tmp_path_factory.mktemp("output_format")
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8), y=np.arange(60) % 10)
    cpu = ("--device", "cpu")
    done = {"folder": folder}
    done["train"] = ok(run("harden", "train", "--data", "data.npz", "--arch", "small-cnn", "--epochs", "1",
                           "--batch-size", "20", *cpu, "-o", "m.safetensors", cwd=folder))
    done["convert"] = ok(run("harden", "convert", "m.safetensors", cwd=folder))
    done["finetune"] = ok(run("harden", "finetune", "m.hard.safetensors", "--data", "data.npz", "--train", "ibp",
                              "--eps", "0.1", "--epochs", "2", "--batch-size", "5", *cpu, "-o", "t.safetensors",
                              cwd=folder))
    done["export"] = ok(run("harden", "export", "t.safetensors", "-o", "t.onnx", cwd=folder))
    done["inspect"] = ok(run("harden", "inspect", "t.safetensors", cwd=folder))
    done["certify"] = ok(run("certify", "t.onnx", "--eps", "0.1", "--limit", "20", *cpu, cwd=folder))
    done["certify_json"] = ok(run("certify", "t.onnx", "--eps", "0.1", "--limit", "20", *cpu, "--json", "-",
                                  cwd=folder))
    return done


@pytest.mark.parametrize("step", ["train", "convert", "finetune", "export", "inspect", "certify", "certify_json"])
def test_no_library_warning_reaches_stderr(runs, step):
    stderr = runs[step].stderr
    assert not [line for line in stderr.splitlines() if "Warning" in line or "warn(" in line], stderr


@pytest.mark.parametrize("step, name", [("train", "train"), ("finetune", "finetune"), ("certify", "certify")])
def test_progress_is_plain_lines_when_not_a_terminal(runs, step, name):
    lines = [line for line in runs[step].stderr.splitlines() if line.startswith(f"{name}: ")]
    assert lines, runs[step].stderr
    for line in lines:
        assert len(line) < 100 and re.match(rf"{name}: \d+/\d+ \(\d+%\) \d+:\d\d:\d\d elapsed", line), line
    assert re.match(rf"{name}: (\d+)/\1 \(100%\)", lines[-1]), lines
    assert not any(c in runs[step].stderr for c in "━\r\x1b"), "a bar's drawing reached a non-terminal"


def test_finetune_lines_come_at_most_every_tenth(runs):
    # 60 samples in batches of 5 for 2 epochs: 24 steps, so a line every 10% is at most ~11 lines.
    lines = [line for line in runs["finetune"].stderr.splitlines() if line.startswith("finetune: ")]
    assert 2 <= len(lines) <= 12, lines
    assert "epoch 2/2" in lines[-1] and "24/24" in lines[-1], lines


def test_result_tables_go_to_stdout(runs):
    certify = runs["certify"]
    assert "certified" in certify.stdout and "0.1" in certify.stdout, certify.stdout
    assert "certified" not in certify.stderr and "┏" not in certify.stderr, certify.stderr
    inspect = runs["inspect"]
    assert "sigma" in inspect.stdout and "Lipschitz" in inspect.stdout, inspect.stdout
    assert "┏" not in inspect.stderr, inspect.stderr


def test_json_dash_keeps_stdout_pure_json(runs):
    document = json.loads(runs["certify_json"].stdout)
    assert document["results"] and "certified" not in runs["certify_json"].stderr.split("{")[0]


def test_convert_refuses_to_overwrite_its_default_output(runs):
    folder = runs["folder"]
    first = (folder / "m.hard.safetensors").read_bytes()
    again = run("harden", "convert", "m.safetensors", "--spectral-norm", "2.0", cwd=folder)
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert again.returncode == 2 and len(lines) == 1, again.stderr
    assert "m.hard.safetensors" in lines[0] and "-o" in lines[0] and lines[0].startswith("error: "), lines
    assert (folder / "m.hard.safetensors").read_bytes() == first
    # An explicit -o is the user's choice: it overwrites, as before.
    ok(run("harden", "convert", "m.safetensors", "--spectral-norm", "2.0", "-o", "m.hard.safetensors", cwd=folder))
    assert (folder / "m.hard.safetensors").read_bytes() != first


@pytest.mark.parametrize("args", [[], *([c] for c in HARDEN_COMMANDS)])
def test_harden_help_shows_no_bool_type(args):
    result = CliRunner().invoke(harden_app, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0 and "--help" in result.output, result.output
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output, result.output


def test_certify_help_shows_no_bool_type():
    result = CliRunner().invoke(certify_app, ["--help"], terminal_width=100)
    assert result.exit_code == 0 and "--quiet" in result.output, result.output
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output, result.output


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(total: int, *, seconds_per_step: float, width: int = 80, status: str = "loss 0.38") -> list[str]:
    out, clock = Console(file=io.StringIO(), width=width), Clock()
    with LineProgress(out, clock=clock) as bar:
        task = bar.add_task("finetune", total=total, status="")
        for _ in range(total):
            clock.now += seconds_per_step
            bar.update(task, advance=1, status=status)
    return out.file.getvalue().splitlines()


def test_line_progress_every_tenth_of_the_work_when_fast():
    lines = _lines(1000, seconds_per_step=0.001)
    assert len(lines) == 10 and lines[-1].startswith("finetune: 1000/1000 (100%) "), lines
    assert lines[0] == "finetune: 100/1000 (10%) 0:00:00 elapsed, eta 0:00:00, loss 0.38", lines


def test_line_progress_every_ten_seconds_when_slow():
    lines = _lines(100, seconds_per_step=LINE_EVERY_S / 2)
    assert len(lines) == 50, lines  # every second step: ten seconds passed, though 2% of the work
    assert lines[0] == "finetune: 2/100 (2%) 0:00:10 elapsed, eta 0:08:10, loss 0.38", lines


def test_line_progress_never_wider_than_the_console():
    lines = _lines(10, seconds_per_step=1.0, width=50, status="epoch 1/2 " + "x" * 200)
    assert lines and all(len(line) < 50 and line.endswith("...") for line in lines), lines


def test_terminal_bar_fits_80_columns():
    out = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    with progress_bar(out=out) as bar:
        task = bar.add_task("finetune-longer-than-twelve", total=1876, status="")
        bar.update(task, advance=940, status="epoch 1/2 loss 0.38 clean 0.91 robust 0.55 and more and more")
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.file.getvalue()).split("\r")[-1].strip("\n")
    assert final.strip() and "940/1876" in final, final
    assert all(len(line) <= 80 for line in final.splitlines()) and len(final.splitlines()) == 1, final


def test_quiet_prints_nothing():
    out = Console(file=io.StringIO(), width=80)
    with progress_bar(quiet=True, out=out) as bar:
        bar.update(bar.add_task("certify", total=3, status=""), advance=3, status="done")
    assert out.file.getvalue() == ""


VERIVITAL = ROOT.parent / "shared" / "vnncomp" / "verivital_mnist_conv"


@pytest.mark.skipif(not VERIVITAL.is_dir(), reason="shared VNN-COMP benchmarks not present")
def test_vnnlib_run_on_a_third_party_model_is_clean(tmp_path):
    done = ok(run("certify", VERIVITAL / "Convnet_avgpool.onnx", "--vnnlib",
                  VERIVITAL / "specs" / "avgpool_specs" / "prop_0_0.02.vnnlib", "--device", "cpu", cwd=tmp_path))
    assert not [line for line in done.stderr.splitlines() if "Warning" in line], done.stderr
    assert "prop_0_0.02.vnnlib" in done.stdout and "unsat" in done.stdout, done.stdout
    assert [line for line in done.stderr.splitlines() if re.match(r"vnnlib: 1/1 \(100%\)", line)], done.stderr
