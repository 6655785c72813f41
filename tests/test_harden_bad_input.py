"""Every mistake a user can make on the `harden` command line: ONE line `error: ...`, exit code 2,
no traceback, no output file (nor a `.partial` one), and found before the long work starts.

The fixtures are real and tiny: a small CNN trained by `harden train` on a 60-image 8x8 .npz, a
checkpoint written by `harden finetune`, an ONNX file written by `harden export`. Each bad input
is tagged with the last stage allowed to run before it is refused:
  options  nothing is loaded: no model, no data, no work;
  model    the model may be read (its input shape or range decides), not the data;
  data     the data may be read too (labels, classes), but no training/export step starts.
The functions of the later stages are replaced by ones that fail loudly, so an error found too
late shows up as an internal error (exit 3) instead of passing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from certify.common.errors import UserError
from harden.io.bundle import Bundle
from harden.io.bundle_file import save_bundle
from harden.cli import app
from harden.io.zoo import small_cnn

SHAPE = (1, 8, 8)
MODEL_COMMANDS = ("convert", "export", "inspect", "finetune", "prune")
COMMANDS = ("train", *MODEL_COMMANDS)
TRAINING = ("train", "finetune", "prune")
SUFFIX = {"export": ".onnx", "inspect": ".json"}
# The first piece of real work of each command (replaced in the tests by a loud failure).
WORK = {"train": "harden.training.train.train_clean", "convert": "harden.convert.convert",
        "export": "harden.io.export.export_onnx", "inspect": "harden.inspect.inspect_bundle",
        "finetune": "harden.training.finetune._run", "prune": "harden.pruning.prune.attach_masks"}
LOADERS = {"model": "harden.io.loading.load_model", "data": "certify.data.datasets.load_dataset"}


def invoke(args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8)
    np.savez(folder / "data.npz", x=x, y=np.arange(60) % 10)
    np.savez(folder / "data12.npz", x=x[:24], y=np.arange(24) % 12)        # labels 10 and 11: beyond the model
    np.savez(folder / "data10px.npz", x=rng.integers(0, 256, (20, 10, 10), dtype=np.uint8), y=np.arange(20) % 10)
    np.savez(folder / "one_class.npz", x=x[:10], y=np.zeros(10, dtype=np.int64))
    model = folder / "model.safetensors"
    code, output = invoke(["train", "--data", folder / "data.npz", "--arch", "small-cnn", "--epochs", "1",
                           "--batch-size", "20", "--device", "cpu", "--quiet", "-o", model])
    assert code == 0, output
    torch.manual_seed(0)
    save_bundle(Bundle(small_cnn(SHAPE, 100), SHAPE, 100, {"kind": "zoo", "name": "small-cnn"},
                       data={"dataset": str(folder / "data.npz"), "input_range": [0.0, 1.0]}),
                folder / "model100.safetensors")
    code, output = invoke(["finetune", model, "--data", folder / "data.npz", "--train", "clean", "--batch-size", "20",
                           "--device", "cpu", "--quiet", "-o", folder / "tuned.safetensors"])
    assert code == 0, output
    checkpoint = (folder / "tuned.ckpt.safetensors").read_bytes()
    (folder / "truncated.ckpt.safetensors").write_bytes(checkpoint[: len(checkpoint) // 2])
    (folder / "garbage.ckpt.safetensors").write_bytes(b"not a checkpoint at all" * 10)
    code, output = invoke(["export", model, "-o", folder / "model.onnx"])
    assert code == 0, output
    return folder


def snapshot(*folders: Path) -> set[Path]:
    return {path for folder in folders for path in folder.rglob("*")}


def good(command: str, files: Path, out) -> list:
    """A command line that works, writing its output to `out` (bad options are appended to it:
    for a repeated option the last one counts)."""
    model, data = files / "model.safetensors", files / "data.npz"
    return {
        "train": ["train", "--data", data, "--epochs", "1", "--quiet", "-o", out],
        "convert": ["convert", model, "-o", out],
        "export": ["export", model, "-o", out],
        "inspect": ["inspect", model, "--json", out],
        "finetune": ["finetune", model, "--data", data, "--train", "clean", "--quiet", "-o", out],
        "prune": ["prune", model, "--data", data, "--sparsity", "0.5", "--quiet", "-o", out],
    }[command]


@pytest.fixture
def refused(files, tmp_path, monkeypatch):
    """refused(args, message, stage): the command fails as a user error, cleanly and in time."""

    class CalledTooLate(Exception):
        pass

    def refuse(args: list, message: str, stage: str = "options", command: str | None = None) -> str:
        command = command or str(args[0])
        later = [WORK[command]]
        if stage in ("options", "model"):
            later.append(LOADERS["data"])
        if stage == "options":
            later.append(LOADERS["model"])
        for target in later:
            def boom(*_, _target=target, **__):
                raise CalledTooLate(f"{_target} ran before the bad input was refused")
            monkeypatch.setattr(target, boom)
        before = snapshot(files, tmp_path)
        code, output = invoke(args)
        lines = [line for line in output.splitlines() if line.strip()]
        assert code == 2, output
        assert len(lines) == 1 and lines[0].startswith("error: "), output
        assert "Traceback" not in output and message in lines[0], output
        appeared = snapshot(files, tmp_path) - before
        assert not appeared, f"{sorted(appeared)} appeared; {output}"
        assert not [p for p in snapshot(files, tmp_path) if p.name.endswith(".partial")]
        monkeypatch.undo()
        return lines[0]

    return refuse


# --- outputs: every output path of every command, checked before anything is read ---------------------

def _suffix(command: str) -> str:
    return SUFFIX.get(command, ".safetensors")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_that_is_a_folder(command, files, tmp_path, refused):
    folder = tmp_path / f"out{_suffix(command)}"
    folder.mkdir()
    refused(good(command, files, folder), "is a folder")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("below", ["out", "sub/out"])
def test_output_whose_folder_cannot_exist_because_a_file_stands_there(command, below, files, tmp_path, refused):
    # A regular file where the output's folder would be: root cannot write there either.
    (tmp_path / "blocker").write_text("a file, not a folder")
    refused(good(command, files, tmp_path / "blocker" / f"{below}{_suffix(command)}"), "cannot be created")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_in_a_folder_where_creating_a_file_fails(command, files, tmp_path, refused, monkeypatch):
    """The write probe itself fails (what a read-only folder does to a non-root user, or a full
    disk): simulated at tempfile.mkstemp, the call the probe makes."""
    import tempfile

    real = tempfile.mkstemp

    def read_only(*args, prefix=None, dir=None, **kwargs):
        if str(dir).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied")
        return real(*args, prefix=prefix, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr("certify.common.files.tempfile.mkstemp", read_only)
    args = good(command, files, tmp_path / "ro" / f"out{_suffix(command)}")
    line = refused(args, "cannot be written")
    assert "Permission denied" in line


SYS = Path("/sys")


def _sys_is_read_only() -> bool:
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=SYS)
    except OSError:
        return SYS.is_dir()
    os.close(fd)
    os.unlink(probe)
    return False


@pytest.mark.skipif(not _sys_is_read_only(), reason="needs a read-only /sys (a real folder no one, root included, can write)")
@pytest.mark.parametrize("command", COMMANDS)
def test_output_in_a_really_read_only_folder(command, files, refused):
    refused(good(command, files, SYS / "harden-test" / f"out{_suffix(command)}"), "cannot be written")


@pytest.mark.parametrize("command, out, message", [
    ("train", "x.onnx", "not .onnx"),
    ("convert", "x.onnx", "not .onnx"),           # was: safetensors bytes under an .onnx name
    ("convert", "x", "a file without suffix"),
    ("finetune", "x.pt", "not .pt"),
    ("prune", "x.onnx", "not .onnx"),
    ("export", "x.safetensors", "not .safetensors"),
    ("export", "x", "a file without suffix"),
])
def test_output_with_the_wrong_suffix(command, out, message, files, tmp_path, refused):
    refused(good(command, files, tmp_path / out), message)


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_output_that_is_the_input(command, files, refused):
    model = files / ("model.onnx" if command == "export" else "model.safetensors")
    args = good(command, files, model)
    args[1] = model
    refused(args, "also an input")


def test_convert_default_output_gets_the_same_check(files, tmp_path, refused):
    (tmp_path / "m.safetensors").write_bytes((files / "model.safetensors").read_bytes())
    (tmp_path / "m.hard.safetensors").mkdir()
    refused(["convert", tmp_path / "m.safetensors"], "is a folder")
    (tmp_path / "n.hard.safetensors").write_bytes((files / "model.safetensors").read_bytes())
    refused(["convert", tmp_path / "n.hard.safetensors"], "also an input")  # its default output is itself


def test_finetune_checkpoint_paths_are_outputs_too(files, tmp_path, refused):
    args = good("finetune", files, tmp_path / "out.safetensors")
    (tmp_path / "out.ckpt.safetensors").mkdir()  # where the default checkpoint goes
    assert "checkpoint of -o" in refused(args, "is a folder")
    (tmp_path / "file").write_text("x")
    refused([*args, "--checkpoint-dir", tmp_path / "file"], "is a file, not a folder")
    refused([*args, "--checkpoint-dir", tmp_path / "file" / "ckpts"], "cannot be created")
    if _sys_is_read_only():
        refused([*args, "--checkpoint-dir", SYS / "ckpts"], "cannot be written")
    refused([*args, "--resume", files / "tuned.ckpt.safetensors", "-o", files / "tuned.ckpt.safetensors"],
            "also an input")


def test_inspect_json_to_stdout_needs_no_file(files):
    code, output = invoke(["inspect", files / "model.safetensors", "--json", "-", "--max-iters", "20"])
    assert code == 0 and '"layers"' in output


# --- the device: one check (certify.common.distributed.device_kind) ----------------------------------------------

BAD_DEVICES = ["gpu", "tpu", "cuda:x", "", "mps", "cpu:1", f"cuda:{torch.cuda.device_count()}"]


@pytest.mark.parametrize("command", TRAINING)
@pytest.mark.parametrize("device", BAD_DEVICES)
def test_bad_device(command, device, files, tmp_path, refused):
    refused([*good(command, files, tmp_path / "out.safetensors"), "--device", device], "--device")


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_device_kind_is_the_one_check(device):
    from certify.common.distributed import device_kind, resolve_device

    with pytest.raises(UserError, match="--device"):
        device_kind(device)
    with pytest.raises(UserError, match="--device"):
        resolve_device(device)
    assert device_kind("cpu") == "cpu" and resolve_device("auto").type in ("cpu", "cuda")


# --- option values: refused before the model or the data is read -------------------------------------

COMMON_BAD = [
    (["--lr", "-0.1"], "--lr -0.1 is not a positive number"),
    (["--lr", "0"], "--lr 0.0 is not a positive number"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--batch-size", "0"], "--batch-size 0 is below 1"),
    (["--batch-size", "-5"], "--batch-size -5 is below 1"),
    (["--epochs", "0"], "--epochs 0 is below 1"),
    (["--epochs", "-2"], "--epochs -2 is below 1"),
    (["--seed", "-1"], "--seed -1"),
]
FINETUNE_PRUNE_BAD = [
    (["--steps", "0"], "--steps 0 is below 1"),
    (["--eval-limit", "0"], "--eval-limit 0 is below 1"),
    (["--limit", "0"], "--limit 0 is below 1"),
    (["--limit", "-3"], "--limit -3 is below 1"),
    (["--train", "pgd", "--eps", "-0.1"], "--eps -0.1"),
    (["--train", "pgd", "--eps", "nan"], "--eps nan"),
    (["--train", "pgd", "--eps", "inf"], "--eps inf"),
    (["--train", "pgd"], "needs --eps"),
    (["--train", "pgd", "--eps", "0.1", "--norm", "1"], "unknown --norm '1'"),
    (["--train", "madry", "--eps", "0.1"], "unknown --train 'madry'"),
    (["--data", "no-such-dataset"], "unknown dataset 'no-such-dataset'"),
]
FINETUNE_BAD = [
    (["--lr-schedule", "exp"], "unknown --lr-schedule 'exp'"),
    (["--eps-schedule", "cubic"], "unknown --eps-schedule 'cubic'"),
    (["--eps-ramp-epochs", "-1"], "--eps-ramp-epochs -1.0"),
    (["--eps-ramp-epochs", "nan"], "--eps-ramp-epochs nan"),
    (["--eps-ramp-epochs", "3", "--epochs", "2"], "more than --epochs 2"),
    (["--norm-decay", "-1"], "--norm-decay -1.0"),
    (["--norm-decay-p", "2"], "unknown --norm-decay-p"),
    (["--train", "fgm", "--eps", "0.1", "--steps", "-1"], "--steps -1"),
]
PRUNE_BAD = [
    (["--sparsity", "1"], "--sparsity 1.0 is outside [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity -0.1 is outside [0, 1)"),
    (["--sparsity", "nan"], "--sparsity nan is outside [0, 1)"),
    (["--kappa-max", "1"], "--kappa-max 1.0 is not above 1"),
    (["--kappa-max", "0.5"], "--kappa-max 0.5 is not above 1"),
    (["--kappa-max", "nan"], "--kappa-max nan is not above 1"),
    (["--schedule", "linear"], "unknown --schedule 'linear'"),
    (["--cond-form", "svd"], "unknown --cond-form 'svd'"),
    (["--prune-steps", "0"], "--prune-steps 0 is below 1"),
    (["--cond-weight", "-1", "--kappa-max", "10"], "--cond-weight -1.0"),
    (["--tsc-a", "0"], "--tsc-a 0.0 is not positive"),
    (["--tsc-weight", "nan"], "--tsc-weight nan"),
    (["--train", "fgm", "--eps", "0.1"], "unknown --train 'fgm' for pruning"),
]
TRAIN_BAD = [
    (["--arch", "resnet-1000"], "unknown architecture 'resnet-1000'"),
    (["--arch", "mypkg.arch:build"], "built-in architectures only"),
    (["--data", "no-such-dataset"], "unknown dataset"),
]
CONVERT_BAD = [
    (["--spectral-norm", "0"], "--spectral-norm 0.0 is not positive"),
    (["--spectral-norm", "-1"], "--spectral-norm -1.0 is not positive"),
    (["--spectral-norm", "nan"], "--spectral-norm nan"),
    (["--spectral-norm", "inf"], "--spectral-norm inf"),
    (["--sn-iters", "0"], "--sn-iters 0 is outside 1..1000000"),
    (["--sn-iters", "2000000"], "--sn-iters 2000000 is outside 1..1000000"),
    (["--noise", "wca", "--noise-dim", "0"], "--noise-dim 0 is below 1"),
    (["--noise", "wca", "--noise-dim", "-4"], "--noise-dim -4 is below 1"),
    (["--noise", "gauss"], "unknown --noise 'gauss'"),
    (["--layers", "conv,attention"], "unknown --layers kind attention"),
    (["--layers", ","], "--layers names no layer kind"),
    (["--input-shape", "1,x,8"], "--input-shape"),
    (["--input-shape", "1,0,8"], "--input-shape"),
]
EXPORT_BAD = [
    (["--std", "0"], "--std 0 has a value <= 0"),
    (["--std", "-0.5"], "--std -0.5 has a value <= 0"),
    (["--std", "nan"], "--std nan has a value that is not a finite number"),
    (["--std", "inf"], "--std inf has a value that is not a finite number"),
    (["--mean", "nan"], "--mean nan has a value that is not a finite number"),
    (["--mean", "abc"], "--mean 'abc' is not a comma-separated list of numbers"),
    (["--mean", "0.1,0.2", "--std", "0.3,0.3,0.3"], "--mean/--std gives 2 means but 3 standard deviations"),
    (["--data", "no-such-dataset"], "unknown dataset"),
]
INSPECT_BAD = [
    (["--max-iters", "0"], "--max-iters 0 is below 1"),
    (["--max-iters", "-10"], "--max-iters -10 is below 1"),
]
OPTION_CASES = (
    [(c, a, m) for c in TRAINING for a, m in COMMON_BAD]
    + [(c, a, m) for c in ("finetune", "prune") for a, m in FINETUNE_PRUNE_BAD]
    + [("finetune", a, m) for a, m in FINETUNE_BAD]
    + [("prune", a, m) for a, m in PRUNE_BAD]
    + [("train", a, m) for a, m in TRAIN_BAD]
    + [("convert", a, m) for a, m in CONVERT_BAD]
    + [("export", a, m) for a, m in EXPORT_BAD]
    + [("inspect", a, m) for a, m in INSPECT_BAD]
)


@pytest.mark.parametrize("command, extra, message", OPTION_CASES,
                         ids=[f"{c}{''.join(a)}" for c, a, _ in OPTION_CASES])
def test_bad_option_value(command, extra, message, files, tmp_path, refused):
    refused([*good(command, files, tmp_path / f"out{_suffix(command)}"), *extra], message)


@pytest.mark.parametrize("args, message", [
    (["finetune", "MODEL"], "Missing option '-o'"),
    (["prune", "MODEL", "-o", "OUT"], "Missing option '--sparsity'"),
    (["train", "--epochs", "three", "-o", "OUT"], "Invalid value for '--epochs'"),
    (["finetune", "MODEL", "--lr", "fast", "-o", "OUT"], "Invalid value for '--lr'"),
    (["export", "MODEL", "-o", "OUT", "--no-such-option"], "No such option"),
    (["compress", "MODEL"], "No such command 'compress'"),
])
def test_usage_errors_are_one_line_too(args, message, files, tmp_path, refused):
    swap = {"MODEL": files / "model.safetensors", "OUT": tmp_path / "out.safetensors"}
    args = [swap.get(a, a) for a in args]
    refused(args, message, command="train" if args[0] == "compress" else args[0])


# --- values that need the model: eps against its input range, normalization against its channels -----

@pytest.mark.parametrize("command, extra, message", [
    ("finetune", ["--train", "pgd", "--eps", "1.5"], "larger than the whole input range"),
    ("finetune", ["--train", "pgd", "--eps", "9", "--norm", "2"], "larger than the whole input range"),
    ("prune", ["--train", "pgd", "--eps", "1.5"], "larger than the whole input range"),
    ("export", ["--mean", "0.1,0.2,0.3", "--std", "0.2,0.2,0.2"], "--mean 0.1,0.2,0.3 gives 3 values, the model's input has 1 channel"),
    ("export", ["--std", "0.2,0.3"], "--std 0.2,0.3 gives 2 values, the model's input has 1 channel"),
])
def test_bad_value_for_this_model(command, extra, message, files, tmp_path, refused):
    refused([*good(command, files, tmp_path / f"out{_suffix(command)}"), *extra], message, stage="model")


def test_one_normalization_value_is_broadcast_to_every_channel():
    from certify.specs.input_spec import check_normalization

    check_normalization([0.5], [0.25], (3, 32, 32))              # one value for all three channels
    check_normalization([0.4, 0.5, 0.6], [0.2, 0.2, 0.2], (3, 32, 32))
    check_normalization([0.4, 0.5, 0.6], [0.2], (3, 32, 32))     # per-channel means, one std for all
    check_normalization([0.4, 0.5, 0.6], [0.2])                  # channels unknown: can fit a 3-channel model
    with pytest.raises(UserError, match="gives 2 values"):
        check_normalization([0.4, 0.5], [0.2, 0.2], (3, 32, 32))


# --- data that does not fit the model -----------------------------------------------------------------

@pytest.mark.parametrize("command", ["finetune", "prune"])
@pytest.mark.parametrize("model, data, message", [
    ("model100.safetensors", "data.npz", "the model has 100 outputs but the data has 10 classes"),
    ("model.safetensors", "data12.npz", "has label 11 but the model has 10 outputs"),
    ("model.safetensors", "data10px.npz", "samples of shape (1, 10, 10), the model expects (1, 8, 8)"),
])
def test_data_that_does_not_fit_the_model(command, model, data, message, files, tmp_path, refused):
    args = good(command, files, tmp_path / "out.safetensors")
    args[1] = files / model
    refused([*args, "--data", files / data], message, stage="data")


def test_train_refuses_data_with_one_class(files, tmp_path, refused):
    refused([*good("train", files, tmp_path / "out.safetensors"), "--data", files / "one_class.npz"],
            "1 class(es)", stage="data")


# --- --resume -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("resume, extra, message, stage", [
    ("missing.ckpt.safetensors", [], "does not exist", "model"),
    ("truncated.ckpt.safetensors", [], "is not a readable checkpoint", "model"),
    ("garbage.ckpt.safetensors", [], "is not a readable checkpoint", "model"),
    ("model.safetensors", [], "not a harden checkpoint", "model"),
    (".", [], "is a folder", "model"),
    ("tuned.ckpt.safetensors", ["--lr", "0.01"], "other settings (lr 0.001 there, 0.01 here", "model"),
    ("tuned.ckpt.safetensors", ["--train", "pgd", "--eps", "0.1"], "other settings", "model"),
    ("tuned.ckpt.safetensors", ["--limit", "30"], "made on 60 training samples, this run has 30", "data"),
])
def test_bad_resume(resume, extra, message, stage, files, tmp_path, refused):
    args = [*good("finetune", files, tmp_path / "out.safetensors"), "--batch-size", "20",
            "--resume", files / resume, *extra]
    refused(args, message, stage=stage)


def test_resume_from_another_model(files, tmp_path, refused):
    args = good("finetune", files, tmp_path / "out.safetensors")
    args[1] = files / "model100.safetensors"
    refused([*args, "--batch-size", "20", "--resume", files / "tuned.ckpt.safetensors"],
            "does not fit this model", stage="model")


def test_finetune_checkpoints_go_through_atomic_path(files, tmp_path):
    """A killed run's temporary checkpoint (its process gone) is removed by the next run."""
    out = tmp_path / "out.safetensors"
    stale = tmp_path / ".out.ckpt.safetensors.999999999.x1y2z3.partial"
    stale.write_bytes(b"half a checkpoint")
    code, output = invoke([*good("finetune", files, out), "--batch-size", "30", "--device", "cpu"])
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ckpt.safetensors", "out.safetensors"]


# --- --trust-code reaches the loader ---------------------------------------------------------------------

@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_trust_code_is_passed_to_load_model(command, files, tmp_path, monkeypatch):
    seen = []

    def load_model(path, **options):
        seen.append(options["trust_code"])
        raise UserError("stopped after loading", "test")

    monkeypatch.setattr("harden.io.loading.load_model", load_model)
    args = good(command, files, tmp_path / f"out{_suffix(command)}")
    for flag, expected in (([], False), (["--trust-code"], True)):
        code, output = invoke([*args, *flag])
        assert code == 2 and "stopped after loading" in output, output
        assert seen[-1] is expected
    code, output = invoke([command, "--help"])
    assert code == 0 and "--trust-code" in output


# --- the Python API gets the same checks ------------------------------------------------------------------

def test_config_validate_refuses_before_any_data():
    from harden.convert import check_options
    from harden.training.finetune import FinetuneConfig
    from harden.pruning.prune import PruneConfig

    for config in (FinetuneConfig(lr=math.nan), FinetuneConfig(batch_size=0), FinetuneConfig(eval_limit=0),
                   FinetuneConfig(train="clean", epochs=2, eps_ramp_epochs=3), FinetuneConfig(train="pgd")):
        with pytest.raises(UserError):
            config.validate()
    with pytest.raises(UserError, match="larger than the whole input range"):
        FinetuneConfig(train="pgd", eps=0.5).validate((1, 8, 8), (0.0, 0.25))
    for config in (PruneConfig(sparsity=math.nan), PruneConfig(sparsity=0.5, kappa_max=1.0),
                   PruneConfig(sparsity=0.5, steps=0), PruneConfig(sparsity=0.5, eval_limit=0)):
        with pytest.raises(UserError):
            config.validate()
    with pytest.raises(UserError, match="--spectral-norm inf"):
        check_options(spectral_norm=math.inf)


# --- kill -9 -------------------------------------------------------------------------------------------

def _harden(args: list) -> list[str]:
    import sys

    return [sys.executable, "-m", "harden", *[str(a) for a in args]]


def _kill_when(process, ready, timeout: float = 120.0) -> bool:
    """SIGKILL `process` as soon as `ready()` holds; False when it ended first."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.wait(timeout=timeout)
    return False


def test_kill_9_of_export_never_leaves_a_partial_model(files, tmp_path):
    import subprocess

    import onnx

    out = tmp_path / "m.onnx"
    process = subprocess.Popen(_harden(["export", files / "model.safetensors", "-o", out]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed = _kill_when(process, lambda: any(p.name.endswith(".partial") for p in tmp_path.iterdir()))
    if out.exists():  # the rename happened first: then the file is whole
        onnx.checker.check_model(onnx.load(str(out)))
    assert killed or out.exists()
    if killed:
        assert not out.exists()
    # The next run removes the killed run's temporary file and writes the model.
    code, output = invoke(["export", files / "model.safetensors", "-o", out])
    assert code == 0, output
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    onnx.checker.check_model(onnx.load(str(out)))


def test_resume_after_kill_9_ends_on_the_same_weights(files, tmp_path):
    import subprocess

    from safetensors.torch import load_file

    run = ["finetune", files / "model.safetensors", "--data", files / "data.npz", "--train", "pgd", "--eps", "0.1",
           "--steps", "2", "--epochs", "25", "--batch-size", "20", "--norm-decay", "1e-3", "--seed", "4",
           "--device", "cpu", "--quiet"]
    straight, killed_out = tmp_path / "straight.safetensors", tmp_path / "killed.safetensors"
    checkpoint = tmp_path / "killed.ckpt.safetensors"
    process = subprocess.Popen(_harden([*run, "-o", killed_out]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed = _kill_when(process, checkpoint.exists)
    if not killed:
        pytest.skip("the run ended before its first checkpoint could be interrupted")
    assert not killed_out.exists()
    code, output = invoke([*run, "-o", straight])
    assert code == 0, output
    code, output = invoke([*run, "--resume", checkpoint, "-o", killed_out])
    assert code == 0, output
    a, b = load_file(str(straight)), load_file(str(killed_out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
