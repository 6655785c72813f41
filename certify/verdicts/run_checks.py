"""Checks of a dataset run's options, model and data, all made before the first sample is certified."""

from __future__ import annotations

import math

from certify.verdicts.cascade import CASCADE_METHODS as METHODS
from certify.common import distributed
from certify.common.errors import UserError
from certify.specs.input_spec import InputSpec, check_norm, check_normalization


def check_run_options(eps_values: list[float], *, methods=METHODS, limit: int | None = None, batch_size: int = 50,
                      split: str = "test", radius: bool = False, radius_tol: float | None = 1e-3,
                      radius_max: float | None = None, attack_steps: int = 50, attack_restarts: int = 3,
                      mean: list[float] | None = None, std: list[float] | None = None,
                      device: str | None = None, seed: int = 0, norm: str = "inf") -> None:
    """Every check of a dataset run that needs neither the model nor the data: a UserError on the
    first bad option, before any file is read (the command line runs it before anything else)."""
    from certify.data.datasets import SPLITS

    check_norm(norm)
    if not eps_values and not radius:
        raise UserError("no --eps given", "give at least one --eps, e.g. --eps 0.1 (or --radius)")
    for eps in eps_values:
        if not (math.isfinite(eps) and eps > 0):
            raise UserError(f"eps {eps} is out of range", "give a positive finite eps, e.g. --eps 0.1")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown --method {', '.join(unknown) or '(none)'}", f"use one of {', '.join(METHODS)}")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit {limit} is not positive", "give a positive number of samples")
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size} is not positive", "give e.g. --batch-size 50")
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}", f"use one of: {', '.join(SPLITS)}")
    check_attack_options(attack_steps, attack_restarts, seed)
    if radius_tol is not None and not (math.isfinite(radius_tol) and radius_tol > 0):
        raise UserError(f"--radius-tol {radius_tol} is out of range", "give a small positive tolerance, e.g. 1e-3")
    if radius_max is not None and not (math.isfinite(radius_max) and radius_max > 0):
        raise UserError(f"--radius-max {radius_max} is out of range", "give a positive eps, e.g. --radius-max 0.3")
    if radius and radius_tol is not None and radius_max is not None and radius_tol >= radius_max:
        raise UserError(f"--radius-tol {radius_tol:g} is not below --radius-max {radius_max:g}",
                        "give a tolerance smaller than the largest eps searched")
    check_normalization(mean, std)
    distributed.device_kind(device)


def check_attack_options(attack_steps: int, attack_restarts: int, seed: int = 0) -> None:
    if attack_steps < 1:
        raise UserError(f"--attack-steps {attack_steps} is not positive", "give e.g. --attack-steps 50 (or --no-attack)")
    if attack_restarts < 1:
        raise UserError(f"--attack-restarts {attack_restarts} is not positive",
                        "give e.g. --attack-restarts 3 (or --no-attack)")
    if not -2 ** 62 <= seed <= 2 ** 62:  # torch generators take 64-bit seeds; batches add offsets to it
        raise UserError(f"--seed {seed} is out of range", "give a seed between -2**62 and 2**62, e.g. --seed 0")


def check_against_model(eps_values: list[float], spec: InputSpec, model, radius: bool, radius_tol: float,
                         radius_max: float | None, normalization_from: str = "--mean/--std") -> None:
    """The checks that need the model and its spec (input range, normalization, classes)."""
    shape = tuple(model.input_shape)
    for eps in eps_values:
        spec.check_eps(eps, input_shape=shape)
    width = spec.largest_eps(shape)
    if radius:
        if radius_max is not None:
            spec.check_eps(radius_max, "--radius-max", shape)
        if not radius_tol < (radius_max if radius_max is not None else width):
            raise UserError(f"--radius-tol {radius_tol:g} is out of range",
                            f"give 0 < tol < {radius_max if radius_max is not None else width:g}, e.g. 1e-3")
    check_normalization(spec.mean, spec.std, tuple(model.input_shape), source=normalization_from)
    if model.outputs < 2:
        raise UserError(f"{model.path.name} returns {model.outputs} value(s) per sample; a classifier needs one "
                        "logit per class (at least 2)",
                        "certify a classifier that outputs (batch, classes), or check a property with --vnnlib")
    if spec.classes and len(spec.classes) != model.outputs:
        raise UserError(f"{model.path.name} returns {model.outputs} logits, but its metadata names "
                        f"{len(spec.classes)} classes", "re-export the model; its metadata is damaged")


def check_data_fits(dataset, model, dataset_name: str) -> None:
    if len(dataset) == 0:
        raise UserError(f"the data {dataset_name} holds no samples", "give data with at least one sample")
    if dataset.x[0].numel() != math.prod(model.input_shape):
        raise UserError(f"the data has samples of shape {tuple(dataset.x.shape[1:])}, the model expects "
                        f"{tuple(model.input_shape)}", "certify the model on the data it was trained for")
    top = int(dataset.y.max())
    if top >= model.outputs:
        raise UserError(f"the data has label {top}, but {model.path.name} has {model.outputs} outputs "
                        f"(classes 0..{model.outputs - 1})", "certify the model on the data it was trained for")
    if getattr(dataset, "classes_known", True) and len(dataset.classes) != model.outputs:
        raise UserError(f"{model.path.name} has {model.outputs} outputs, but {dataset_name} has "
                        f"{len(dataset.classes)} classes", "certify the model on the data it was trained for")
