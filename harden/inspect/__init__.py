"""`harden inspect`: every layer's norms, and product upper bounds on the network's Lipschitz constants.

The layers are found by running one zero input through the model (eval mode, WCA noise off) with
forward hooks on every leaf module, which also records each layer's real input size: a conv's
norms depend on it. For every Conv2d / Linear (after any spectral-norm or pruning
parametrization, i.e. the weight the model uses):
  - the l2 operator norm by power iteration in float64 (norms.operator_spectral_norm) until the
    estimated relative error is below `tol`, with the iterations used and whether it got there;
    where it did not (close top singular values) and the layer's explicit matrix is small enough,
    the exact value from that matrix, labelled so;
  - the exact l1 and linf operator norms (norms.l1_norm / linf_norm) on that input size;
  - the condition number of the weight matrix (a kernel as C_out x C_in*kh*kw) and its sparsity;
    inf for a rank-deficient matrix, and for a pruned one also that of its live part (harden.pruning.prune).

Lipschitz bounds. For a network that is a chain of layers, ||f(x) - f(x')|| <= prod_i L_i ||x - x'||
where L_i is each layer's Lipschitz constant in that norm: the operator norm of a Conv2d / Linear
(biases do not count), the largest |gamma|/sqrt(var+eps) of an eval BatchNorm, sqrt(windows per
pixel) (l2) or 1 (linf) for max/average pooling, max|c| for a multiplication by a constant, and
1 for ReLU, tanh, sigmoid, reshapes and shifts. These are UPPER bounds, usually loose: the
product ignores how the layers line up. They do not hold for a graph that joins two computed
values (a residual or concat): that is found in the torch.fx graph (an ONNX import's, or the one
traced from a model's own forward, such as an architecture factory's) and reported instead of a
number; a forward that cannot be traced gets no number either (harden.inspect.graph). The l2 product uses the power-iteration values, which approach each norm
from below to within `tol` (an estimate); the Hoelder product sqrt(l1 * linf) per weight layer is
given too, a bound with no iteration in it. Beside them, the sound bounds of harden.inspect.sound
(certify's Lipschitz certificate: exact SVD or Gram iteration per layer, labelled), or "not a bound".
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from certify.common.errors import UserError
from harden.inspect.graph import _graph_structure, _in_graph_order
from harden.inspect.layer_gains import _other_layer_gain, _trace, _weight_layer
from harden.inspect.sound import sound_bounds, sound_lines

SCHEMA = "harden.inspect/1"
MAX_ITERS = 2000
TOLERANCE = 1e-6


def check_options(*, max_iters: int = MAX_ITERS, tol: float = TOLERANCE) -> None:
    """Refuse power-iteration settings that cannot work (one-line UserError), before any loading."""
    if not (isinstance(max_iters, int) and not isinstance(max_iters, bool) and max_iters >= 1):
        raise UserError(f"--max-iters {max_iters} is below 1", "use e.g. 2000")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise UserError(f"tolerance {tol} is not a positive number", "use e.g. 1e-6")



def inspect_model(module: nn.Module, input_shape: tuple[int, ...], *, max_iters: int = MAX_ITERS,
                  tol: float = TOLERANCE) -> dict:
    """Per-layer norms and the product Lipschitz bounds of `module` on inputs of `input_shape`
    (one sample, e.g. (1, 28, 28)). Returns a JSON-ready dict: "layers" (one entry per layer call,
    in execution order) and "lipschitz" (the bounds, or why there is none, and the assumptions)."""
    check_options(max_iters=max_iters, tol=tol)
    calls = _trace(module, tuple(input_shape))
    rows: list[dict] = []
    assumptions = ["the bounds are for the deterministic network: WCA noise off, dropout off, BatchNorm with its running statistics"]
    unbounded: list[str] = []
    cache: dict[tuple, dict] = {}
    for call in calls:
        row = {"name": call.name, "type": type(call.module).__name__, "input_shape": list(call.input_shape),
               "output_shape": list(call.output_shape)}
        if isinstance(call.module, (nn.Conv2d, nn.Linear)):
            key = (id(call.module), call.input_shape)
            if key not in cache:
                cache[key] = _weight_layer(call.module, call.input_shape, max_iters, tol)
            row.update(cache[key])
            if not row["spectral_norm"]["converged"] and "power_iteration_value" not in row["spectral_norm"]:
                assumptions.append(f"the power iteration of '{call.name}' stopped at {max_iters} steps before "
                                   f"reaching tolerance {tol:g}: its sigma may be low")
        else:
            l2, linf, basis = _other_layer_gain(call, assumptions, unbounded)
            row.update({"l2_gain": l2, "linf_gain": linf, "basis": basis})
        rows.append(row)
    graph, graph_gains, why_not = _graph_structure(module, assumptions)
    if unbounded:
        why_not = why_not or f"layer(s) {', '.join(unbounded)} have no Lipschitz bound here"
    if graph_gains:
        rows = _in_graph_order(graph, rows, graph_gains)
    bounds = _bounds(rows, why_not, assumptions, tol)
    bounds.update(sound_bounds(module, tuple(input_shape), why_not))
    return {"schema": SCHEMA, "input_shape": list(input_shape), "layers": rows, "lipschitz": bounds}


def inspect_bundle(bundle, *, path: str | Path | None = None, max_iters: int = MAX_ITERS,
                   tol: float = TOLERANCE) -> dict:
    """`inspect_model` on a loaded bundle, with what the file is."""
    document = inspect_model(bundle.module, tuple(bundle.input_shape), max_iters=max_iters, tol=tol)
    model = {"path": str(path) if path is not None else None, "description": bundle.describe(),
             "input_shape": list(bundle.input_shape), "num_classes": bundle.num_classes,
             "recipe": bundle.recipe}
    if path is not None:
        from certify.common.files import sha256_file

        model["sha256"] = sha256_file(path)
    return {"schema": document.pop("schema"), "model": model, **document}



# -- bounds and output ---------------------------------------------------------------------------------

def _bounds(rows: list[dict], why_not: str | None, assumptions: list[str], tol: float) -> dict:
    result = {"l2_upper_bound": None, "linf_upper_bound": None, "l2_upper_bound_hoelder": None,
              "why_not": why_not,
              "method": "product over the layers of each layer's Lipschitz constant (upper bounds; "
                        "activations and parameter-free layers counted as 1-Lipschitz unless listed)",
              "assumptions": assumptions + [
                  f"the l2 product uses power-iteration sigmas, each within relative {tol:g} of the true norm "
                  "(from below); l2_upper_bound_hoelder uses sqrt(l1 * linf) per weight layer instead"]}
    if why_not is not None:
        return result
    l2 = linf = hoelder = 1.0
    for row in rows:
        l2 *= row["l2_gain"]
        linf = linf * row["linf_gain"] if linf is not None and row["linf_gain"] is not None else None
        if "spectral_norm" in row:
            hoelder = hoelder * math.sqrt(row["l1_norm"] * row["linf_norm"]) \
                if hoelder is not None and row["l1_norm"] is not None else None
        elif hoelder is not None:
            hoelder *= row["l2_gain"]
    result.update({"l2_upper_bound": l2, "linf_upper_bound": linf, "l2_upper_bound_hoelder": hoelder})
    return result


def write_inspection(document: dict, path: str | Path) -> None:
    import json

    from certify.common.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=1))


def _condition_cell(row: dict) -> str:
    full = "inf" if row["condition_number"] is None else f"{row['condition_number']:.3g}"
    live = row.get("live_condition_number")
    return f"{full} (live {live:.3g})" if row["condition_number"] is None and live is not None else full


def inspection_table(document: dict):
    """A rich Table for people, and the lines to print under it."""
    from rich.table import Table

    title = document.get("model", {}).get("path") or "model"
    table = Table(title=f"harden inspect {title}  (input {tuple(document['input_shape'])})")
    for column in ("layer", "type", "weight", "input", "sigma (iters)", "l1", "linf", "cond", "zeros",
                   "l2 gain", "linf gain"):
        table.add_column(column, justify="left" if column in ("layer", "type") else "right")

    def number(value, fmt="{:.4g}"):
        return "-" if value is None else fmt.format(value)

    for row in document["layers"]:
        sn = row.get("spectral_norm")
        sigma = "-"
        if sn:
            sigma = f"{sn['value']:.4g} ({sn['iterations']}{'' if sn['converged'] else ', not converged'})"
            if row.get("sn_beta") is not None:
                sigma += f" <= {row['sn_beta']:g}" if sn["value"] <= row["sn_beta"] * (1 + 1e-3) else f" > beta {row['sn_beta']:g}!"
        table.add_row(row["name"], row["type"], "x".join(map(str, row.get("weight_shape", []))) or "-",
                      "x".join(map(str, row.get("input_shape", []))) or "-", sigma,
                      number(row.get("l1_norm")), number(row.get("linf_norm")),
                      _condition_cell(row) if "condition_number" in row else "-",
                      number(row.get("sparsity"), "{:.1%}") if "sparsity" in row else "-",
                      number(row.get("l2_gain")), number(row.get("linf_gain")))
    bounds = document["lipschitz"]
    lines = []
    if bounds["why_not"]:
        lines.append(f"no Lipschitz bound: {bounds['why_not']}")
    else:
        lines.append(f"l2 Lipschitz constant   ~= {bounds['l2_upper_bound']:.6g}  (estimate: product of the layers' l2 gains, "
                     "power-iteration sigmas approach each norm from below)")
        if bounds["l2_upper_bound_hoelder"] is not None:
            lines.append(f"                        <= {bounds['l2_upper_bound_hoelder']:.6g}  (upper bound: product of sqrt(l1*linf), no power iteration)")
        if bounds["linf_upper_bound"] is not None:
            lines.append(f"linf Lipschitz constant <= {bounds['linf_upper_bound']:.6g}  (upper bound: product of the layers' linf gains)")
    lines += sound_lines(bounds)
    lines += [f"assumed: {a}" for a in bounds["assumptions"]]
    return table, lines
