"""`harden`: change models -- train, convert (rewrite layers), export. Each command is a thin layer
over the library function of the same name."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from certify.common.cli import OneLineErrorsGroup, parse_floats, run_cli
from certify.common.errors import UserError
from certify.common.files import check_output_path
from certify.common.progress import say


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineErrorsGroup,
                  help="Harden PyTorch classifiers: train, convert (spectral norm), export to ONNX.")

ARCH_HELP = "Architecture for weights-only files: small-cnn, mlp, mlp-elu-512 or package.module:factory."
DEBUG = typer.Option(False, "--debug", help="Show tracebacks.")
TRUST_PICKLE = typer.Option(False, "--trust-pickle", help="Allow what can run code from the file: a fully pickled module, torch.export.load of a .pt2, TorchScript that reads or writes files.")
TRUST_CODE = typer.Option(False, "--trust-code", help="Allow the architecture factory recorded in a bundle to be "
                          "imported and called (runs code named by the file).")
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda where present)."
BUNDLE = (".safetensors",)


def parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--input-shape '{text}' is not a comma-separated list of integers", "e.g. --input-shape 1,28,28") from None
    if not shape or any(d <= 0 for d in shape):
        raise UserError(f"--input-shape '{text}' has a non-positive size", "e.g. --input-shape 1,28,28")
    return shape


def _load(model: Path, arch, trust_pickle: bool, trust_code: bool, input_shape: Optional[tuple[int, ...]]):
    from harden.io.loading import load_model

    return load_model(model, arch=arch, trust_pickle=trust_pickle, trust_code=trust_code, input_shape=input_shape)


def _check_data_name(name: Optional[str]) -> None:
    """--data names a dataset certify knows, or a .npz file / folder that exists (checked before
    anything is loaded or downloaded; reading it comes later)."""
    from certify.data.datasets import KNOWN_DATASETS

    if name is None:
        return
    path = Path(name).expanduser()
    if name.lower() in KNOWN_DATASETS or path.is_dir() or (path.is_file() and path.suffix.lower() == ".npz"):
        return
    what = "not a .npz file or a folder" if path.exists() else "not a known name, and no such file or folder"
    raise UserError(f"unknown dataset {name!r} ({what})",
                    f"use one of {', '.join(KNOWN_DATASETS)}, a .npz file with arrays x and y, or a folder of class folders")


def _data_inputs(data: Optional[str]) -> list[Path]:
    """A --data that is a file: an input no output may overwrite."""
    return [Path(data)] if data is not None and Path(data).is_file() else []


def _check_checkpoints(output: Path, checkpoint_dir: Optional[Path], epochs: int, inputs: list[Path]) -> None:
    """finetune's checkpoint files, checked like every output before any work: OUT.ckpt.safetensors
    next to -o, or --checkpoint-dir/epoch-NNNN.ckpt.safetensors for each epoch."""
    from harden.training.finetune import default_checkpoint, epoch_checkpoint

    if checkpoint_dir is None:
        try:
            check_output_path(default_checkpoint(output), inputs, option="checkpoint", suffixes=BUNDLE)
        except UserError as error:
            raise UserError(f"{error.what} (the checkpoint of -o {output})",
                            "choose another -o, or give --checkpoint-dir") from None
        return
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise UserError(f"--checkpoint-dir {checkpoint_dir} is a file, not a folder",
                        "give a folder (it is created when missing)")
    for epoch in range(1, epochs + 1):
        path = epoch_checkpoint(checkpoint_dir, epoch)
        if epoch == 1:
            check_output_path(path, inputs, option="--checkpoint-dir", suffixes=BUNDLE)
        elif any(source.exists() and path.exists() and path.samefile(source) for source in inputs):
            raise UserError(f"--checkpoint-dir {checkpoint_dir}: {path.name} is also an input of this command",
                            "choose another --checkpoint-dir")


def _training_data(bundle, data: str | None, limit: int | None, log):
    """The train and test splits for fine-tuning or pruning `bundle` (its own dataset unless --data),
    checked against the model before anything is printed; records the dataset in the bundle's
    metadata when it has none."""
    from certify.data.datasets import load_dataset
    from harden.training.finetune import check_data

    dataset = data or bundle.data.get("dataset")
    if dataset is None:
        raise UserError("the model records no dataset", "give --data mnist|fashion-mnist|file.npz|folder")
    messages: list[str] = []
    train_set = load_dataset(dataset, split="train", log=messages.append).subset(limit)
    test_set = load_dataset(dataset, split="test", log=messages.append)
    check_data(bundle, train_set, test_set)
    if log is not None:
        for message in messages:
            log(message)
    bundle.data.setdefault("dataset", dataset)
    bundle.data.setdefault("classes", train_set.classes)
    bundle.data.setdefault("input_range", [0.0, 1.0])
    return train_set, test_set


@app.command()
def train(
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the model (.safetensors bundle)."),
    data: str = typer.Option("mnist", "--data", help="mnist, fashion-mnist, file.npz or a folder of class folders."),
    arch: str = typer.Option("small-cnn", "--arch", help="small-cnn, mlp, mlp-elu-512."),
    epochs: int = typer.Option(3, "--epochs", help="Passes over the training set."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    batch_size: int = typer.Option(128, "--batch-size"),
    seed: int = typer.Option(0, "--seed", help="Makes the run repeat exactly on the same machine."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    debug: bool = DEBUG,
) -> None:
    """Train a classifier from scratch (clean training): the starting point of the pipeline."""

    def body():
        from certify.data.datasets import load_dataset
        from harden.io.architecture import build_plain_module, resolve_arch
        from harden.io.bundle import Bundle
        from harden.io.bundle_file import save_bundle
        from harden.training.train import check_common_options, pick_device, seed_everything, train_clean

        # Everything that can be wrong with the options, before the data is read (or downloaded).
        check_common_options(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        record = resolve_arch(arch)
        if record["kind"] != "zoo":
            raise UserError("harden train builds the built-in architectures only",
                            "train your own architecture yourself, then use harden convert/finetune on its weights")
        _check_data_name(data)
        check_output_path(output, _data_inputs(data), suffixes=BUNDLE)
        pick_device(device)
        messages: list[str] = []
        train_set = load_dataset(data, split="train", log=messages.append)
        test_set = load_dataset(data, split="test", log=messages.append)
        if len(train_set.classes) < 2:
            raise UserError(f"the data {data} has {len(train_set.classes)} class(es)",
                            "a classifier needs at least 2 classes")
        if tuple(test_set.x.shape[1:]) != tuple(train_set.x.shape[1:]):
            raise UserError(f"the test images have shape {tuple(test_set.x.shape[1:])}, the training images "
                            f"{tuple(train_set.x.shape[1:])}", "give a dataset whose splits have one image size")
        if len(test_set) and int(test_set.y.max()) >= len(train_set.classes):
            raise UserError(f"the test data has label {int(test_set.y.max())}, the training data "
                            f"{len(train_set.classes)} classes", "give a dataset whose splits have the same classes")
        for message in messages:
            say(message, quiet=quiet)
        input_shape = tuple(train_set.x.shape[1:])
        seed_everything(seed)
        bundle = Bundle(build_plain_module(record, input_shape, len(train_set.classes)), input_shape,
                        len(train_set.classes), record,
                        data={"dataset": data, "classes": train_set.classes, "input_range": [0.0, 1.0]},
                        source={"path": None, "format": "trained", "sha256": None})
        result = train_clean(bundle, train_set, test_set, epochs=epochs, lr=lr, batch_size=batch_size,
                             seed=seed, device=device, quiet=quiet)
        save_bundle(bundle, output)
        say(f"test accuracy {100 * result['test_accuracy']:.2f}% after {epochs} epochs; wrote {output}")

    run_cli(body, debug)


@app.command()
def convert(
    model: Path = typer.Argument(..., help="Model file (any accepted format)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="A .safetensors bundle (default: MODEL's name with .hard.safetensors)."),
    spectral_norm: float = typer.Option(4.0, "--spectral-norm", help="beta > 0: each layer's operator norm is clipped to at most beta."),
    sn_iters: int = typer.Option(1, "--sn-iters", help="Power iterations per training forward pass (at least 1)."),
    layers: str = typer.Option("conv,linear", "--layers", help="Which layers to normalize: conv, linear or both."),
    no_spectral_norm: bool = typer.Option(False, "--no-spectral-norm", help="Leave the layers as they are (e.g. to add only --noise wca)."),
    noise: Optional[str] = typer.Option(None, "--noise", help="wca: add the weight-covariance-alignment noise layer before the final Linear."),
    noise_dim: int = typer.Option(32, "--noise-dim", help="Dimension D of the WCA noise (a Linear to D is added when the penultimate width differs)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Per-sample input shape C,H,W (for formats that do not record it)."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    debug: bool = DEBUG,
) -> None:
    """Rewrite every Conv2d/Linear into a spectrally normalized one (true operator norm, clipped at beta);
    optionally add the WCA noise layer before the final Linear."""

    def body():
        from harden.io.bundle_file import save_bundle
        from harden.convert import check_options, convert as convert_bundle, default_output

        beta = None if no_spectral_norm else spectral_norm
        kinds = tuple(part.strip() for part in layers.split(",") if part.strip())
        check_options(spectral_norm=beta, sn_iters=sn_iters, layers=kinds, noise=noise, noise_dim=noise_dim)
        shape = parse_shape(input_shape)
        out = output or default_output(model)
        check_output_path(out, [model], suffixes=BUNDLE)
        bundle = _load(model, arch, trust_pickle, trust_code, shape)
        records = convert_bundle(bundle, spectral_norm=beta, sn_iters=sn_iters, layers=kinds,
                                 noise=noise, noise_dim=noise_dim)
        for step in bundle.recipe:
            if step["step"] == "wca":
                say(f"  {step['layer']:<12} wca     noise N(0, L L^T) of dim {step['noise_dim']} before the final Linear"
                    f"{' (with a projection to it)' if step['projection'] else ''}; "
                    f"{'same function with the noise off' if step['function_preserved'] else 'approximates the old classifier (rank > dim)'}")
        for r in records:
            clipped = "clipped" if r["sigma_before"] > spectral_norm else "kept"
            say(f"  {r['name']:<12} {r['type']:<7} input {tuple(r['input_hw']) if r.get('input_hw') else '-'}  "
                f"sigma {r['sigma_before']:.3f} -> {r['sigma_after']:.3f} ({clipped})")
        save_bundle(bundle, out)
        if records:
            say(f"spectral norm beta={spectral_norm} on {len(records)} layers")
        say(f"wrote {out}")

    run_cli(body, debug)


@app.command()
def export(
    model: Path = typer.Argument(..., help="Model file (any accepted format)."),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write (.onnx)."),
    deterministic: bool = typer.Option(True, "--deterministic/--stochastic", help="Drop (default) or keep the WCA noise layer."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Per-sample input shape C,H,W."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    data: Optional[str] = typer.Option(None, "--data", help="Dataset to record for certification (default: the model's)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Record the input normalization (x - mean) / std the model expects: one mean per input channel, comma-separated, or ONE value used for every channel."),
    std: Optional[str] = typer.Option(None, "--std", help="The standard deviations of that normalization (> 0): as many values as --mean, one per channel or one for all."),
    debug: bool = DEBUG,
) -> None:
    """Export to ONNX (dynamic batch, certification metadata) and check parity with onnxruntime."""

    def body():
        from harden.io.export import check_normalization, export_onnx

        means, stds = parse_floats(mean, "--mean"), parse_floats(std, "--std")
        check_normalization(means, stds)  # the channel count once the model is read
        _check_data_name(data)
        shape = parse_shape(input_shape)
        check_output_path(output, [model], suffixes=(".onnx",))
        bundle = _load(model, arch, trust_pickle, trust_code, shape)
        check_normalization(means if means is not None else bundle.data.get("mean"),
                            stds if stds is not None else bundle.data.get("std"), tuple(bundle.input_shape))
        if data is not None:
            bundle.data["dataset"] = data
        if means is not None:
            bundle.data["mean"] = means
        if stds is not None:
            bundle.data["std"] = stds
        parity = export_onnx(bundle, output, deterministic=deterministic)
        if "max_abs_diff" in parity:
            say(f"onnxruntime parity on {parity['samples']} inputs: max |diff| {parity['max_abs_diff']:.2e}")
        say(f"wrote {output}")

    run_cli(body, debug)


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="Model file (any accepted format, ONNX included)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full inspection as JSON; '-' for stdout."),
    max_iters: int = typer.Option(2000, "--max-iters", help="Most power-iteration steps per layer, at least 1 (stops earlier at relative 1e-6)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Per-sample input shape C,H,W."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    debug: bool = DEBUG,
) -> None:
    """Per layer: operator norms (l2, l1, linf), condition number, sparsity; product upper bounds on
    the network's l2 and linf Lipschitz constants."""

    def body():
        import json

        from rich.console import Console

        from harden.inspect import check_options, inspect_bundle, inspection_table, write_inspection

        check_options(max_iters=max_iters)
        shape = parse_shape(input_shape)
        to_stdout = json_out is not None and str(json_out) == "-"
        if json_out is not None and not to_stdout:
            check_output_path(json_out, [model], option="--json")
        bundle = _load(model, arch, trust_pickle, trust_code, shape)
        document = inspect_bundle(bundle, path=model, max_iters=max_iters)
        if to_stdout:
            sys.stdout.write(json.dumps(document, indent=1) + "\n")
            return
        table, notes = inspection_table(document)
        # The inspection is this command's result: stdout, wide enough for the table when piped.
        out = Console() if sys.stdout.isatty() else Console(width=160)
        out.print(table)
        for line in notes:
            out.print(line, highlight=False)
        if json_out is not None:
            write_inspection(document, json_out)
            say(f"wrote {json_out}")

    run_cli(body, debug)


@app.command()
def finetune(
    model: Path = typer.Argument(..., help="Model file (any accepted format)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the fine-tuned model (.safetensors bundle)."),
    data: Optional[str] = typer.Option(None, "--data", help="mnist, fashion-mnist, file.npz or a folder of class folders (default: the model's)."),
    train: str = typer.Option("pgd", "--train", help="Objective: clean, fgm, pgd, trades, ibp or crown-ibp."),
    eps: Optional[float] = typer.Option(None, "--eps", help="Radius to train for, in pixel units (needed except for clean)."),
    norm: str = typer.Option("inf", "--norm", help="Norm of the eps ball: inf or 2."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the training set."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant or cosine (decays to 0 at the last step)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Global batch (split across processes under torchrun)."),
    steps: int = typer.Option(10, "--steps", help="PGD/TRADES attack steps (step size 2.5 * eps / steps)."),
    eps_ramp_epochs: Optional[float] = typer.Option(None, "--eps-ramp-epochs", help="Epochs over which eps grows from 0, at most --epochs (default: half the epochs for ibp/crown-ibp, 0 otherwise)."),
    eps_schedule: str = typer.Option("linear", "--eps-schedule", help="Shape of the eps ramp: linear or smooth."),
    true_labels: bool = typer.Option(False, "--true-labels", help="Attack the true labels instead of the model's predictions."),
    norm_decay: Optional[float] = typer.Option(None, "--norm-decay", help="Norm decay strength beta (Liang & Huang), e.g. 1e-3."),
    norm_decay_p: str = typer.Option("inf", "--norm-decay-p", help="Norm that norm decay shrinks: inf or 1."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Train on the first N training samples only."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Evaluate on the first N test samples only."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a checkpoint (same MODEL, data and options)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Keep one checkpoint per epoch here (default: one file OUT.ckpt.safetensors, rewritten each epoch)."),
    seed: int = typer.Option(0, "--seed", help="Makes the run repeat exactly on the same machine."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Per-sample input shape C,H,W."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    debug: bool = DEBUG,
) -> None:
    """Adversarial (fgm, pgd, trades) or certified (ibp, crown-ibp) fine-tuning; runs unchanged under torchrun."""

    def body():
        from harden.io.bundle_file import save_bundle
        from harden.training.finetune import (FinetuneConfig, check_resume, default_checkpoint, finetune as run_finetune,
                                     main_process)
        from harden.training.train import check_limit, pick_device

        # Every check that needs no data, in the order a user fixes things: options, outputs, device.
        config = FinetuneConfig(train=train, eps=0.0 if eps is None else eps, norm=norm, epochs=epochs, lr=lr,
                                batch_size=batch_size, seed=seed, steps=steps, eps_ramp_epochs=eps_ramp_epochs,
                                eps_schedule=eps_schedule, attack_labels="true" if true_labels else "predicted",
                                lr_schedule=lr_schedule, norm_decay=norm_decay, norm_decay_p=norm_decay_p,
                                eval_limit=eval_limit)
        config.validate()
        check_limit(limit)
        _check_data_name(data)
        shape = parse_shape(input_shape)
        inputs = [model, *_data_inputs(data)]
        check_output_path(output, inputs + ([resume] if resume is not None else []), suffixes=BUNDLE)
        # The default checkpoint may be the --resume file: continuing rewrites it, as intended.
        _check_checkpoints(output, checkpoint_dir, epochs, inputs + [output])
        pick_device(device)
        bundle = _load(model, arch, trust_pickle, trust_code, shape)
        config.validate(tuple(bundle.input_shape), tuple(bundle.data.get("input_range", (0.0, 1.0))))
        if resume is not None:
            check_resume(resume, config, bundle.module)
        train_set, test_set = _training_data(bundle, data, limit, say if main_process() and not quiet else None)
        checkpoint = None if checkpoint_dir is not None else default_checkpoint(output)
        record = run_finetune(bundle, train_set, test_set, config, device=device, checkpoint=checkpoint,
                              checkpoint_dir=checkpoint_dir, resume=resume, quiet=quiet)
        if not main_process():
            return
        save_bundle(bundle, output)
        robust = ""
        if "test_robust_accuracy" in record:
            robust = f", {record['robust_metric']} {100 * record['test_robust_accuracy']:.2f}%"
        say(f"test clean {100 * record['test_clean_accuracy']:.2f}%{robust} at eps {config.eps:g} "
            f"on {record['test_samples']} samples; wrote {output}")

    run_cli(body, debug)


@app.command()
def prune(
    model: Path = typer.Argument(..., help="Model file (any accepted format)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the pruned model (.safetensors bundle)."),
    sparsity: float = typer.Option(..., "--sparsity", help="Fraction of the Conv2d/Linear weights to zero, in [0, 1)."),
    data: Optional[str] = typer.Option(None, "--data", help="mnist, fashion-mnist, file.npz or a folder of class folders (default: the model's)."),
    schedule: str = typer.Option("cubic", "--schedule", help="cubic (gradual, s_f (1 - (1 - t/T)^3)) or oneshot."),
    prune_steps: int = typer.Option(10, "--prune-steps", help="Pruning events T of the cubic schedule, spread over the first half of the steps."),
    per_layer: bool = typer.Option(False, "--per-layer", help="The same sparsity in every layer (default: one global magnitude ranking)."),
    kappa_max: Optional[float] = typer.Option(None, "--kappa-max", help="Condition-number bound (> 1) of the hinge constraint on every pruned layer."),
    cond_weight: Optional[float] = typer.Option(None, "--cond-weight", help="lambda_c of the condition constraint (default 1 for the hinge, 1e-3 for logdet)."),
    cond_form: str = typer.Option("hinge", "--cond-form", help="hinge (needs --kappa-max) or logdet (the reference's (log(1e-5 + det(G/r)))^2)."),
    tsc_a: float = typer.Option(100.0, "--tsc-a", help="a of the transformed-l1 term rho_a(t) = (a+1) t / (a+t)."),
    tsc_weight: float = typer.Option(0.0, "--tsc-weight", help="lambda_s of the transformed-l1 sparsity term (0: off)."),
    train: Optional[str] = typer.Option(None, "--train", help="clean, pgd or trades (default: the model's last adversarial fine-tuning, else pgd with --eps, else clean)."),
    eps: Optional[float] = typer.Option(None, "--eps", help="Radius for pgd/trades, in pixel units (with --train clean: only the final PGD evaluation)."),
    norm: Optional[str] = typer.Option(None, "--norm", help="Norm of the eps ball: inf or 2 (default: as the objective's source, else inf)."),
    steps: int = typer.Option(10, "--steps", help="PGD/TRADES attack steps."),
    epochs: int = typer.Option(2, "--epochs", help="Passes over the training set (pruning, then fine-tuning under the final mask)."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    batch_size: int = typer.Option(128, "--batch-size"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Train on the first N training samples only."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Evaluate on the first N test samples only."),
    seed: int = typer.Option(0, "--seed", help="Makes the run repeat exactly on the same machine."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Per-sample input shape C,H,W."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    debug: bool = DEBUG,
) -> None:
    """Gradual magnitude pruning with the transformed-l1 term and a condition-number constraint
    (TSCNC), adversarial fine-tuning in the same loop; masks are baked into the weights on export."""

    def body():
        from harden.io.bundle_file import save_bundle
        from harden.pruning.prune import PruneConfig, objective_from_history, prune as run_prune
        from harden.training.train import check_limit, pick_device

        config = PruneConfig(sparsity=sparsity, schedule=schedule, prune_steps=1 if schedule == "oneshot" else prune_steps,
                             scope="per-layer" if per_layer else "global", kappa_max=kappa_max,
                             cond_form=cond_form, cond_weight=cond_weight, tsc_a=tsc_a, tsc_weight=tsc_weight,
                             train=train or ("pgd" if eps else "clean"), eps=0.0 if eps is None else eps,
                             norm=norm or "inf", steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                             eval_limit=eval_limit)
        config.validate()  # before any loading; the objective may still come from the model
        check_limit(limit)
        _check_data_name(data)
        shape = parse_shape(input_shape)
        check_output_path(output, [model, *_data_inputs(data)], suffixes=BUNDLE)
        pick_device(device)
        bundle = _load(model, arch, trust_pickle, trust_code, shape)
        previous = objective_from_history(bundle) if train is None else None
        if previous is not None:
            # Continue the model's adversarial fine-tuning: same objective, eps and norm unless given.
            config.train = previous[0]
            config.eps = eps if eps is not None else previous[1]
            config.norm = norm or previous[2]
        config.validate(tuple(bundle.input_shape), tuple(bundle.data.get("input_range", (0.0, 1.0))))
        if previous is not None:
            say(f"training objective from the model's fine-tuning: {config.train} eps {config.eps:g} (l{config.norm})",
                quiet=quiet)
        train_set, test_set = _training_data(bundle, data, limit, None if quiet else say)
        record = run_prune(bundle, train_set, test_set, config, device=device, quiet=quiet)
        save_bundle(bundle, output)
        final = record["final"]
        robust = ""
        if "test_robust_accuracy" in record:
            robust = f", {record['robust_metric']} {100 * record['test_robust_accuracy']:.2f}% at eps {config.eps:g}"
        kappa = "inf" if final["max_kappa"] is None else f"{final['max_kappa']:.3g}"
        live = "inf" if final["max_live_kappa"] is None else f"{final['max_live_kappa']:.3g}"
        say(f"sparsity {100 * final['sparsity']:.2f}% ({final['zeros']} of {final['entries']} weights); max kappa {kappa} "
            f"(live part {live}); test clean {100 * record['test_clean_accuracy']:.2f}%{robust} "
            f"on {record['test_samples']} samples; wrote {output}")

    run_cli(body, debug)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
