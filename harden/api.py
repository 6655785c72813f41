"""harden's steps on a torch module and tensors, for code that holds its model in memory.

Each function wraps the module in a Bundle (what the command line passes from step to step) and
runs the same internals as the command line: `harden.convert` for spectral normalization,
harden.training.finetune, harden.pruning.prune and harden.io.export. The module is changed in
place, as the command line changes the model it loads; keep a copy.deepcopy if you need the
original. Inputs are pixels in `input_range`; a model that expects normalized inputs takes its
`mean`/`std` here, and every step applies them in front of it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from certify.api import checked_tensors
from certify.common.errors import UserError
from certify.data.base import Dataset
from harden.convert import DEFAULT_BETA, LAYER_KINDS, convert
from harden.io.bundle import Bundle

__all__ = ["spectral_normalize", "finetune", "prune", "export_module"]


def spectral_normalize(model: nn.Module, beta: float = DEFAULT_BETA, *, input_shape: Sequence[int],
                       layers: Sequence[str] = LAYER_KINDS, sn_iters: int = 1) -> nn.Module:
    """Clip each conv / linear layer's true operator norm at `beta` (BatchNorm folded in first).

    `input_shape` is one sample's shape, e.g. (1, 28, 28): a convolution's norm depends on it.
    Returns the model, rewritten in place with parametrizations that fine-tuning keeps in force.
    """
    bundle = _bundle(model, tuple(int(d) for d in input_shape), None)
    convert(bundle, spectral_norm=beta, sn_iters=sn_iters, layers=tuple(layers))
    return bundle.module


def finetune(model: nn.Module, data, labels: torch.Tensor | None = None, *, objective: str = "pgd",
             eps: float = 0.0, epochs: int = 1, test=None, input_range: tuple[float, float] = (0.0, 1.0),
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None, device: str | None = None,
             quiet: bool = True, **settings) -> dict:
    """Fine-tune `model` in place with `objective` (clean, fgm, pgd, trades, ibp, crown-ibp) at `eps`.

    `data` is a tensor of inputs with `labels`, or an iterable of (inputs, labels) batches such as a
    DataLoader; `test` likewise, as (inputs, labels) or batches. Other settings are those of
    harden.training.finetune.FinetuneConfig (lr, batch_size, seed, steps, eps_ramp_epochs, ...).
    Returns the run's record: per-epoch losses and, with `test`, its clean and robust accuracy.
    """
    from harden.training.finetune import FinetuneConfig
    from harden.training.finetune import finetune as finetune_bundle

    train, test_data, bundle = _training_inputs(model, data, labels, test, input_range, mean, std)
    config = _config(FinetuneConfig, train=objective, eps=eps, epochs=epochs, **settings)
    return finetune_bundle(bundle, train, test_data, config, device=device, quiet=quiet)


def prune(model: nn.Module, data, labels: torch.Tensor | None = None, *, sparsity: float,
          kappa_max: float | None = None, objective: str = "clean", eps: float = 0.0, epochs: int = 2, test=None,
          input_range: tuple[float, float] = (0.0, 1.0), mean: Sequence[float] | None = None,
          std: Sequence[float] | None = None, device: str | None = None, quiet: bool = True, **settings) -> dict:
    """Prune `model` in place to `sparsity` while training with `objective`, keeping each layer's
    condition number under `kappa_max` when given. `data` and `test` as for `finetune`; other
    settings are those of harden.pruning.prune.PruneConfig. Returns the run's record."""
    from harden.pruning.prune import PruneConfig
    from harden.pruning.prune import prune as prune_bundle

    train, test_data, bundle = _training_inputs(model, data, labels, test, input_range, mean, std)
    config = _config(PruneConfig, sparsity=sparsity, kappa_max=kappa_max, train=objective, eps=eps, epochs=epochs,
                     **settings)
    return prune_bundle(bundle, train, test_data, config, device=device, quiet=quiet)


def export_module(model: nn.Module, path: str | Path, *, input_shape: Sequence[int],
                  input_range: tuple[float, float] = (0.0, 1.0), mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, classes: Sequence[str] | None = None,
                  dataset: str | None = None, parity_inputs: torch.Tensor | None = None) -> dict:
    """Write `model` as ONNX at `path` with the metadata `certify` reads (input range, normalization,
    classes, dataset), after checking it against onnxruntime; no file when the check fails.
    Parametrizations (spectral norm, pruning masks) are baked into a copy; the model is left as it is.
    Returns the parity record (samples compared, largest difference)."""
    from harden.io.export import export_onnx

    shape = tuple(int(d) for d in input_shape)
    data = {"input_range": [float(v) for v in input_range], "dataset": dataset,
            "classes": None if classes is None else [str(c) for c in classes]}
    bundle = _bundle(model, shape, {**data, **_normalization(mean, std)})
    if classes is not None and len(classes) != bundle.num_classes:
        raise UserError(f"classes names {len(classes)} classes, the model has {bundle.num_classes} outputs",
                        "give one name per output")
    bundle.data = {key: value for key, value in bundle.data.items() if value is not None}
    return export_onnx(bundle, path, parity_inputs=parity_inputs)


def _bundle(model: nn.Module, input_shape: tuple[int, ...], data: dict | None) -> Bundle:
    """The module as a Bundle; its number of classes is what a forward pass returns."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model is a {type(model).__name__}, not a torch.nn.Module",
                        "pass the module; for a model file use harden.load_model")
    was_training = model.training
    try:
        with torch.no_grad():
            parameter = next(model.parameters(), None)
            device = parameter.device if parameter is not None else "cpu"
            logits = model.eval()(torch.zeros(2, *input_shape, device=device))
    except Exception as error:  # noqa: BLE001 -- whatever the user's forward raises, said in one line
        raise UserError(f"the model does not run on inputs of shape {input_shape} ({type(error).__name__})",
                        "give the shape of one input sample, e.g. input_shape=(1, 28, 28)") from None
    finally:
        model.train(was_training)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise UserError(f"the model returns shape {tuple(logits.shape)}, not (batch, classes)",
                        "give a classifier that returns one logit per class")
    classes = int(logits.shape[1])
    data = dict(data or {})
    data.setdefault("classes", [str(k) for k in range(classes)])
    return Bundle(model, input_shape, classes, {"kind": "module", "name": type(model).__name__}, data=data)


def _normalization(mean, std) -> dict:
    return {"mean": None if mean is None else [float(v) for v in mean],
            "std": None if std is None else [float(v) for v in std]}


def _training_inputs(model, data, labels, test, input_range, mean, std) -> tuple[Dataset, Dataset | None, Bundle]:
    """The training and test data as Datasets, and the model as a Bundle that knows its normalization."""
    low, high = (float(v) for v in input_range)
    train = _dataset(data, labels, (low, high), "training data")
    test_data = None if test is None else _dataset(*_pair(test), (low, high), "test data")
    normalization = {key: value for key, value in _normalization(mean, std).items() if value is not None}
    bundle = _bundle(model, tuple(train.x.shape[1:]), {"input_range": [low, high], **normalization})
    for dataset in (train, test_data):
        if dataset is not None:
            dataset.classes = list(bundle.data["classes"])
    return train, test_data, bundle


def _pair(data) -> tuple:
    """`test` as (data, labels): a pair of tensors, or batches (labels None)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data[0], data[1]
    return data, None


def _dataset(data, labels, input_range: tuple[float, float], what: str) -> Dataset:
    if labels is None:
        if isinstance(data, torch.Tensor):
            raise UserError(f"the {what} has inputs but no labels", "pass the labels too, or (inputs, labels) batches")
        data, labels = _concatenate_batches(data, what)
    x, y = checked_tensors(data, labels, input_range)
    return Dataset("tensors", x, y, [], f"{what} passed as tensors")


def _concatenate_batches(batches: Iterable, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    try:
        for batch in batches:
            x, y = batch[0], batch[1]
            xs.append(x)
            ys.append(y)
    except (TypeError, IndexError, KeyError):
        raise UserError(f"the {what} is neither tensors nor an iterable of (inputs, labels) batches",
                        "pass x and y tensors, or a DataLoader") from None
    if not xs:
        raise UserError(f"the {what} holds no batches", "give at least one (inputs, labels) batch")
    try:
        return torch.cat([torch.as_tensor(x) for x in xs]), torch.cat([torch.as_tensor(y) for y in ys])
    except (TypeError, RuntimeError) as error:
        raise UserError(f"the batches of the {what} do not stack ({str(error).splitlines()[0][:200]})",
                        "give batches of equally shaped inputs") from None


def _config(kind, **settings):
    """`kind(**settings)`, an unknown setting named in one line rather than a TypeError."""
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f"unknown setting {', '.join(unknown)}",
                        f"use the fields of {kind.__module__}.{kind.__name__}: {', '.join(sorted(known))}")
    return kind(**settings)
