"""The rewrites a bundle records, and how to re-apply them when a bundle is loaded.

Each step is a JSON record {"step": name, ...options}. Re-applying a step must create exactly the
parametrizations and buffers that the state dict expects; the weights come from the file afterwards.
"""

from __future__ import annotations

from typing import Callable

from certify.common.errors import UserError


def _spectral_norm(bundle, step: dict) -> None:
    from harden.layers.spectral import apply_spectral_norm

    apply_spectral_norm(bundle.module, step["beta"], input_shape=tuple(bundle.input_shape),
                        layers=tuple(step.get("layers", ("conv", "linear"))),
                        n_power_iterations=step.get("n_power_iterations", 1), converge=False)


def _batchnorm_folded(bundle, step: dict) -> None:
    from harden.layers.spectral import fold_batchnorm

    bundle.module = fold_batchnorm(bundle.module)


def _wca(bundle, step: dict) -> None:
    from harden.layers.wca import DEFAULT_INIT_STD, insert_wca

    # The layer is found by its recorded name; its weights (and L) come from the state dict.
    insert_wca(bundle.module, layer=step["layer"], noise_dim=step["noise_dim"],
               init_std=step.get("init_std", DEFAULT_INIT_STD))


def _prune(bundle, step: dict) -> None:
    from harden.layers.masks import attach_masks

    # All-ones masks on the recorded layers; the mask buffers come from the state dict.
    attach_masks(bundle.module, list(step["layers"]))


STEPS: dict[str, Callable] = {
    "fold-batchnorm": _batchnorm_folded,
    "wca": _wca,
    "spectral-norm": _spectral_norm,
    "prune": _prune,
}


def apply_recipe(bundle, recipe: list[dict]) -> None:
    for step in recipe:
        handler = STEPS.get(step.get("step"))
        if handler is None:
            raise UserError(f"unknown rewrite step {step.get('step')!r} in the model file",
                            "the file was written by a newer harden; upgrade harden")
        handler(bundle, step)
        bundle.recipe.append(step)
