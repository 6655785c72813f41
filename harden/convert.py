"""`harden convert`: rewrite a model's layers (spectral normalization of the true operator)."""

from __future__ import annotations

from pathlib import Path

from certify.common.errors import UserError
from harden.io.bundle import Bundle

DEFAULT_BETA = 4.0  # Farnia et al.'s MNIST grid is {4, 8, 16}; 4 keeps accuracy and still clips every layer we tried.
LAYER_KINDS = ("conv", "linear")


def default_output(model_path: str | Path) -> Path:
    path = Path(model_path)
    stem = path.name.split(".")[0]
    return path.with_name(f"{stem}.hard.safetensors")


def check_options(*, spectral_norm: float | None = DEFAULT_BETA, sn_iters: int = 1,
                  layers: tuple[str, ...] = LAYER_KINDS, noise: str | None = None, noise_dim: int = 32) -> None:
    """Refuse conversion options that cannot work (one-line UserError), before the model is read."""
    from certify.common.errors import is_finite_number

    if not layers:
        raise UserError("--layers names no layer kind", f"use a comma-separated subset of {', '.join(LAYER_KINDS)}")
    unknown = [kind for kind in layers if kind not in LAYER_KINDS]
    if unknown:
        raise UserError(f"unknown --layers kind {', '.join(unknown)}", f"use a comma-separated subset of {', '.join(LAYER_KINDS)}")
    if spectral_norm is not None:
        if not (is_finite_number(spectral_norm) and spectral_norm > 0):
            raise UserError(f"--spectral-norm {spectral_norm} is not positive and finite",
                            "give a norm bound beta > 0, e.g. 4")
        if not (isinstance(sn_iters, int) and 1 <= sn_iters <= 1_000_000):
            raise UserError(f"--sn-iters {sn_iters} is outside 1..1000000", "give a few power iterations per step (1 is the usual)")
    if noise is not None and noise != "wca":
        raise UserError(f"unknown --noise {noise!r}", "the noise layer available is wca")
    if not (isinstance(noise_dim, int) and noise_dim >= 1):
        raise UserError(f"--noise-dim {noise_dim} is below 1", "give the noise dimension, e.g. --noise-dim 32")


def convert(bundle: Bundle, *, spectral_norm: float | None = DEFAULT_BETA, sn_iters: int = 1,
            layers: tuple[str, ...] = LAYER_KINDS, noise: str | None = None,
            noise_dim: int = 32) -> list[dict]:
    """Apply the rewrites to `bundle` in place; returns one record per spectrally normalized layer.

    noise="wca" first puts the WCA noise layer before the final Linear (harden.layers.wca; its record is
    the "wca" recipe step), so that spectral normalization then also covers its Linear layers."""
    layers = tuple(layers)
    check_options(spectral_norm=spectral_norm, sn_iters=sn_iters, layers=layers, noise=noise, noise_dim=noise_dim)
    if any(step["step"] == "spectral-norm" for step in bundle.recipe) and spectral_norm is not None:
        raise UserError("this model already has spectral normalization", "convert the original model instead")
    records: list[dict] = []
    if noise is not None:
        from harden.layers.wca import add_wca

        bundle.recipe.append({"step": "wca", **add_wca(bundle.module, tuple(bundle.input_shape), noise_dim=noise_dim)})
    if spectral_norm is not None:
        from harden.layers.spectral import fold_batchnorm, apply_spectral_norm

        if _has_batchnorm(bundle.module):
            # BatchNorm is folded into the layer before it, so the clipped norm is the block's real gain.
            bundle.module = fold_batchnorm(bundle.module)
            bundle.recipe.append({"step": "fold-batchnorm"})
        records = apply_spectral_norm(bundle.module, spectral_norm, input_shape=tuple(bundle.input_shape),
                                      layers=tuple(layers), n_power_iterations=sn_iters)
        bundle.recipe.append({"step": "spectral-norm", "beta": spectral_norm, "layers": list(layers),
                              "n_power_iterations": sn_iters})
    return records


def _has_batchnorm(module) -> bool:
    from torch import nn

    return any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in module.modules())
