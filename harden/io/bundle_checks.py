"""Checks of every harden.* metadata record of a bundle, before any of it is used: a crafted file must end in one UserError, never a KeyError, a huge allocation or code execution."""

from __future__ import annotations

import math
from pathlib import Path

from certify.common.errors import UserError, is_finite_number, load_untrusted_json
from certify.onnx_import.metadata import MAX_CLASSES, check_harden_data, show
from harden.io.architecture import is_factory_ref
from harden.io.bundle import FORMAT_VERSION

# Bounds on what a file may ask us to build, so that a crafted shape cannot allocate terabytes.
MAX_INPUT_ELEMENTS = 1 << 24  # one sample: 16M values (64 MB as float32), e.g. 3 x 2048 x 2048


MAX_INPUT_RANK = 6


_MAX_DEPTH = 64


_DAMAGED_HINT = "re-create the file"


def parse_bundle_metadata(metadata: dict[str, str], path: str | Path, *, file_size: int) -> dict:
    """The harden.* records of a bundle, each checked for the structure the loader relies on.

    Returns arch, input_shape, num_classes, recipe, data, source, history; raises a one-line
    UserError naming the first damaged field."""
    def damaged(detail: str) -> UserError:
        return UserError(f"the harden metadata of {path} is damaged ({detail})", _DAMAGED_HINT)

    version = metadata.get("harden.format")
    if not isinstance(version, str):
        raise damaged("harden.format is missing")
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has harden format {version[:20]!r}, this tool reads {FORMAT_VERSION}",
                        "re-create the file with this version of harden")

    def document(key: str, default: str | None = None):
        raw = metadata.get(key, default)
        if raw is None:
            raise damaged(f"{key} is missing")
        try:
            value = load_untrusted_json(raw, key)
        except UserError as exc:
            raise damaged(exc.what) from None
        if not _printable_json(value, 0):
            raise damaged(f"{key} holds text that is not valid Unicode, or is nested too deeply")
        return value

    arch = check_arch_record(document("harden.arch"), damaged)
    model = document("harden.model")
    if not isinstance(model, dict):
        raise damaged("harden.model is not an object")
    if "input_shape" not in model or "num_classes" not in model:
        raise damaged("harden.model lacks input_shape or num_classes")
    input_shape = check_input_shape(model["input_shape"], damaged, "harden.model input_shape")
    num_classes = model["num_classes"]
    if not _integer(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise damaged(f"harden.model num_classes {show(num_classes)} is not a count of classes")
    recipe = check_recipe(document("harden.recipe", "[]"), damaged, file_size=file_size)
    data = check_data(document("harden.data", "{}"), damaged)
    source = document("harden.source", "{}")
    if not isinstance(source, dict):
        raise damaged("harden.source is not an object")
    history = document("harden.history", "[]")
    if not isinstance(history, list) or not all(isinstance(record, dict) for record in history):
        raise damaged("harden.history is not a list of records")
    for record in history:
        for key in ("run", "train", "norm"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise damaged(f"a harden.history record has {key} {show(record[key])}, not a name")
        if record.get("eps") is not None and not is_finite_number(record["eps"]):
            raise damaged(f"a harden.history record has eps {show(record['eps'])}, not a number")
    return {"arch": arch, "input_shape": input_shape, "num_classes": int(num_classes), "recipe": recipe,
            "data": data, "source": source, "history": history}


def check_arch_record(arch, damaged) -> dict:
    from harden.io.zoo import ARCHITECTURES

    if not isinstance(arch, dict):
        raise damaged("harden.arch is not an object")
    kind = arch.get("kind")
    if arch.get("name") is not None and not (isinstance(arch["name"], str) and arch["name"].isprintable()):
        raise damaged("harden.arch name is not printable text")
    if kind == "zoo":
        if arch.get("name") not in ARCHITECTURES:
            raise damaged(f"harden.arch names the unknown built-in architecture {show(arch.get('name'))}")
    elif kind == "factory":
        if not isinstance(arch.get("ref"), str) or not is_factory_ref(arch["ref"]):
            raise damaged(f"harden.arch factory {show(arch.get('ref'))} is not package.module:function")
    elif kind == "onnx-graph":
        if not isinstance(arch.get("graph"), str):
            raise damaged("harden.arch holds no ONNX graph")
    else:
        raise damaged(f"harden.arch kind {show(kind)} is not zoo, factory or onnx-graph")
    return arch


def check_input_shape(shape, damaged, what: str) -> tuple[int, ...]:
    """A per-sample input shape: 1 to 6 positive sizes, at most MAX_INPUT_ELEMENTS values in all."""
    if not isinstance(shape, (list, tuple)) or not shape or not all(_integer(d) for d in shape):
        raise damaged(f"{what} {show(shape)} is not a list of sizes")
    if len(shape) > MAX_INPUT_RANK or any(d < 1 for d in shape):
        raise damaged(f"{what} {list(shape)} has a size below 1 or more than {MAX_INPUT_RANK} axes")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise damaged(f"{what} {list(shape)} has {math.prod(shape)} values per sample, more than the "
                      f"{MAX_INPUT_ELEMENTS} harden handles")
    return tuple(int(d) for d in shape)


def check_recipe(recipe, damaged, *, file_size: int) -> list[dict]:
    """What harden.io.recipe's handlers read from each step, checked before any of them runs."""
    if not isinstance(recipe, list) or len(recipe) > 100:
        raise damaged("harden.recipe is not a list of steps")
    for index, step in enumerate(recipe):
        where = f"harden.recipe step {index + 1}"
        if not isinstance(step, dict) or not isinstance(step.get("step"), str):
            raise damaged(f"{where} is not a {{'step': name, ...}} record")
        name = step["step"]
        if name == "spectral-norm":
            if not is_finite_number(step.get("beta")) or not step["beta"] > 0:
                raise damaged(f"{where} (spectral-norm) has beta {show(step.get('beta'))}, not a positive number")
            layers = step.get("layers", ["conv", "linear"])
            if not isinstance(layers, list) or not layers or not all(kind in ("conv", "linear") for kind in layers):
                raise damaged(f"{where} (spectral-norm) has layers {show(layers)}, not a list of conv/linear")
            iterations = step.get("n_power_iterations", 1)
            if not _integer(iterations) or not 1 <= iterations <= 1_000_000:
                raise damaged(f"{where} (spectral-norm) has n_power_iterations {show(iterations)}")
        elif name == "wca":
            noise_dim = step.get("noise_dim")
            # The noise factor L is noise_dim x noise_dim and its values are in the file: a larger
            # noise_dim than the file can hold is damage, not something to allocate.
            if not _integer(noise_dim) or not 1 <= noise_dim or noise_dim * noise_dim > file_size:
                raise damaged(f"{where} (wca) has noise_dim {show(noise_dim)}, not a size that fits the file")
            if not isinstance(step.get("layer"), str) or not step["layer"]:
                raise damaged(f"{where} (wca) names no layer")
            if "init_std" in step and (not is_finite_number(step["init_std"]) or not step["init_std"] > 0):
                raise damaged(f"{where} (wca) has init_std {show(step['init_std'])}, not a positive number")
        elif name == "prune":
            layers = step.get("layers")
            if not isinstance(layers, list) or not all(isinstance(layer, str) for layer in layers):
                raise damaged(f"{where} (prune) has layers {show(layers)}, not a list of layer names")
        # other names: harden.io.recipe.apply_recipe refuses them (a newer harden wrote the file)
    return recipe


def check_data(data, damaged) -> dict:
    """harden.data: what certification needs (dataset, classes, input range, normalization)."""
    data = check_harden_data(data, lambda detail: damaged(f"harden.data {detail}"))
    if data.get("input_shape") is not None:
        check_input_shape(data["input_shape"], damaged, "harden.data input_shape")
    return data


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _printable_json(value, depth: int) -> bool:
    # json.loads accepts lone surrogates ("\udcff"), which break printing and re-saving later.
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(_printable_json(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(_printable_json(key, depth + 1) and _printable_json(item, depth + 1) for key, item in value.items())
    return True


