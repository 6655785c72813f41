"""`harden.data`: what a model file records for certification (dataset, classes, input range,
normalization, input shape). One check, used wherever it is read: ONNX metadata here and in
harden, and harden's safetensors bundles.
"""

from __future__ import annotations

import json
from typing import Callable

from certify.common.errors import UserError, is_finite_number, load_untrusted_json

MAX_CLASSES = 1_000_000
HINT = "re-export the model with harden export, or remove the 'harden.data' metadata and pass --data"


def show(value) -> str:
    """An offending value as it appears in the file (JSON), cut short."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def check_harden_data(data, fail: Callable[[str], UserError]) -> dict:
    """Check the decoded `harden.data` object field by field; `fail(detail)` makes the error.

    A single mean / std number becomes a one-element list (one value for every channel).
    """
    if not isinstance(data, dict):
        raise fail("it is not a JSON object")
    if data.get("dataset") is not None and not (isinstance(data["dataset"], str) and data["dataset"]):
        raise fail(f"dataset {show(data['dataset'])} is not a name")
    if "classes" in data and not (isinstance(data["classes"], list) and len(data["classes"]) <= MAX_CLASSES
                                  and all(isinstance(c, str) for c in data["classes"])):
        raise fail(f"classes {show(data['classes'])} is not a list of names")
    if "input_range" in data:
        value = data["input_range"]
        if not (isinstance(value, list) and len(value) == 2 and all(is_finite_number(v) for v in value)
                and value[0] < value[1]):
            raise fail(f"input_range {show(value)} is not [low, high] with low < high")
    for name in ("mean", "std"):
        value = data.get(name)
        if value is None:
            continue
        if is_finite_number(value):
            value = data[name] = [value]
        if not (isinstance(value, list) and value and all(is_finite_number(v) for v in value)) \
                or (name == "std" and any(v <= 0 for v in value)):
            rule = "positive finite numbers" if name == "std" else "finite numbers"
            raise fail(f"{name} {show(value)} is not a list of {rule}")
    if data.get("input_shape") is not None:
        value = data["input_shape"]
        if not (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                          for v in value)):
            raise fail(f"input_shape {show(value)} is not a list of positive sizes")
    return data


def parse_harden_data(raw, what: str = "the metadata 'harden.data'") -> dict:
    """Decode and check the `harden.data` text of a model file."""
    if not isinstance(raw, str):
        raise UserError(f"{what} is not text", HINT)
    return check_harden_data(load_untrusted_json(raw, what, HINT),
                             lambda detail: UserError(f"{what} is damaged: {detail}", HINT))
