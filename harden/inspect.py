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
values (a residual or concat), which is detected for torch.fx graphs (ONNX imports) and reported
instead of a number. The l2 product uses the power-iteration values, which approach each norm
from below to within `tol`; the Hoelder product sqrt(l1 * linf) per weight layer is given too, a
bound with no iteration in it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from certify.common.errors import UserError
from harden.layers.norms import (ConvOperator, conv_operator_matrix, effective_weight, l1_norm, linf_norm,
                          operator_spectral_norm, sparsity)
from harden.pruning.prune import kappa, live_kappa
from harden.layers.wca import WCAHead, WCANoise, noise_disabled

SCHEMA = "harden.inspect/1"
MAX_ITERS = 2000
TOLERANCE = 1e-6
EXACT_LIMIT = 8_000_000  # matrix entries (64 MB in float64) up to which a stalled sigma is computed exactly

# Activations whose Lipschitz constant is at most 1 in every norm (element-wise, slope in [0, 1]).
_ONE_LIPSCHITZ = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Softplus,
                  nn.CELU, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink)
# Maps that change no distance at all.
_ISOMETRIES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
# Element-wise activations with a slope above 1 somewhere: their largest slope.
_STEEP = {nn.GELU: 1.1289, nn.SiLU: 1.0999, nn.Mish: 1.0885}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.squeeze, torch.unsqueeze,
                    torch.transpose}
_SHAPE_METHODS = {"reshape", "view", "flatten", "permute", "transpose", "squeeze", "unsqueeze",
                  "contiguous"}
_ONE_LIPSCHITZ_FUNCTIONS = {torch.relu, F.relu, torch.tanh, torch.sigmoid, F.hardtanh, F.relu6}
_ONE_LIPSCHITZ_METHODS = {"relu", "tanh", "sigmoid"}


@dataclass
class _Call:
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


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
    graph_gains, why_not = _graph_structure(module, assumptions)
    if unbounded:
        why_not = why_not or f"layer(s) {', '.join(unbounded)} have no Lipschitz bound here"
    if graph_gains:
        rows = _in_graph_order(module, rows, graph_gains)
    return {"schema": SCHEMA, "input_shape": list(input_shape), "layers": rows,
            "lipschitz": _bounds(rows, why_not, assumptions, tol)}


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


# -- the forward trace ---------------------------------------------------------------------------

def _parametrization_modules(module: nn.Module) -> set[nn.Module]:
    return {m for layer in module.modules() if parametrize.is_parametrized(layer)
            for m in layer.parametrizations.modules()}


def _is_leaf(module: nn.Module) -> bool:
    """A module that computes something itself: no children other than its parametrizations."""
    return all(child == "parametrizations" for child, _ in module.named_children())


def _leaf_modules(module: nn.Module) -> dict[nn.Module, str]:
    skip = _parametrization_modules(module)
    return {m: name for name, m in module.named_modules() if m not in skip and _is_leaf(m)}


def _trace(module: nn.Module, input_shape: tuple[int, ...]) -> list[_Call]:
    leaves = _leaf_modules(module)
    calls: list[_Call] = []

    def record(layer: nn.Module, args: tuple, output) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append(_Call(leaves[layer] or "(model)", layer, tuple(args[0].shape[1:]), tuple(output.shape[1:])))

    handles = [layer.register_forward_hook(record) for layer in leaves]
    modes = {m: m.training for m in module.modules()}
    module.eval()
    reference = next(iter(module.parameters()), torch.zeros(()))
    try:
        with torch.no_grad(), noise_disabled(module):
            module(torch.zeros((1, *input_shape), dtype=reference.dtype, device=reference.device))
    except (RuntimeError, ValueError, TypeError) as err:
        raise UserError(f"the model does not run on an input of shape {tuple(input_shape)}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}",
                        "give the per-sample input shape with --input-shape C,H,W") from None
    finally:
        for handle in handles:
            handle.remove()
        for layer, mode in modes.items():
            layer.training = mode
    return calls


# -- per layer -------------------------------------------------------------------------------------

def _weight_layer(layer: nn.Module, input_shape: tuple[int, ...], max_iters: int, tol: float) -> dict:
    input_hw = tuple(input_shape[-2:]) if isinstance(layer, nn.Conv2d) else None
    sigma, steps = operator_spectral_norm(layer, input_hw, iters=max_iters, tol=tol)
    spectral = {"value": sigma, "iterations": steps, "converged": steps < max_iters,
                "method": f"power iteration (float64) to relative {tol:g}"}
    if not spectral["converged"]:
        exact = _exact_spectral_norm(layer, input_hw)
        if exact is not None:
            spectral.update({"value": exact, "power_iteration_value": sigma,
                             "method": f"explicit matrix (power iteration short of {tol:g} after {steps} steps)"})
            sigma = exact
    try:
        l1, linf, exact_note = l1_norm(layer, input_hw), linf_norm(layer, input_hw), None
    except UserError as error:  # e.g. reflect padding: no exact tap-sum formula
        l1 = linf = None
        exact_note = error.what
    weight = effective_weight(layer)
    # A pruned layer is often singular by its zero pattern (a unit whose weights are all pruned):
    # kappa is inf there, not LAPACK's round-off ratio; the live part (zero rows/columns dropped)
    # is what the layer still computes.
    condition = kappa(weight)
    row = {
        "weight_shape": list(weight.shape),
        "spectral_norm": spectral,
        "l1_norm": l1, "linf_norm": linf,
        "condition_number": None if math.isinf(condition) else condition,  # None: rank-deficient
        "live_condition_number": _finite_or_none(live_kappa(weight)) if bool((weight == 0).any()) else None,
        "sparsity": sparsity(weight),
        "sn_beta": _spectral_norm_beta(layer),
        "l2_gain": sigma, "linf_gain": linf,
        "basis": "operator norm on the layer's input size",
    }
    if exact_note:
        row["note"] = exact_note
    return row


def _finite_or_none(value: float) -> float | None:
    return None if math.isinf(value) else value


def _exact_spectral_norm(layer: nn.Module, input_hw: tuple[int, int] | None) -> float | None:
    """The largest singular value of the layer's explicit matrix, when that matrix is small enough
    (close top singular values can stall the power iteration for thousands of steps)."""
    if isinstance(layer, nn.Conv2d):
        op = ConvOperator.of(layer, input_hw)
        entries = layer.in_channels * input_hw[0] * input_hw[1] * layer.out_channels * op.output_hw[0] * op.output_hw[1]
        if entries > EXACT_LIMIT:
            return None
        matrix = conv_operator_matrix(layer, input_hw)
    else:
        matrix = effective_weight(layer).to(torch.float64)
        if matrix.numel() > EXACT_LIMIT:
            return None
    # sigma_max^2 is the top eigenvalue of the smaller Gram matrix: cheaper than an SVD.
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt())


def _spectral_norm_beta(layer: nn.Module) -> float | None:
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    return next((float(item.beta) for item in layer.parametrizations.weight if hasattr(item, "beta")), None)


def _other_layer_gain(call: _Call, assumptions: list[str], unbounded: list[str]) -> tuple:
    layer = call.module
    if isinstance(layer, _ISOMETRIES):
        return 1.0, 1.0, "keeps distances"
    if isinstance(layer, WCANoise):
        return 1.0, 1.0, "WCA noise, off: the identity"
    if isinstance(layer, _ONE_LIPSCHITZ):
        return 1.0, 1.0, "1-Lipschitz activation"
    if isinstance(layer, (nn.LeakyReLU, nn.ELU)):
        slope = abs(layer.negative_slope) if isinstance(layer, nn.LeakyReLU) else abs(layer.alpha)
        gain = max(1.0, slope)
        return gain, gain, "largest slope of the activation"
    for kind, slope in _STEEP.items():
        if isinstance(layer, kind):
            return slope, slope, "largest slope of the activation"
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if layer.running_var is None:
            unbounded.append(call.name)
            return None, None, "BatchNorm without running statistics is not a fixed map"
        scale = (layer.running_var.double() + layer.eps).rsqrt()
        if layer.weight is not None:
            scale = scale * layer.weight.detach().double()
        gain = float(scale.abs().max())
        return gain, gain, "largest |gamma|/sqrt(var+eps)"
    if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
        overlap = _pool_overlap(layer, call.input_shape)
        # Each output changes by at most the largest change in its window; a pixel is in `overlap` windows.
        return math.sqrt(overlap), 1.0, f"pooling, a pixel in at most {overlap} windows"
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        overlap = _adaptive_overlap(layer, call.input_shape)
        return math.sqrt(overlap), 1.0, f"pooling, a pixel in at most {overlap} windows"
    if any(True for _ in layer.parameters(recurse=False)):
        unbounded.append(call.name)
        return None, None, f"{type(layer).__name__} with weights: not analysed"
    assumptions.append(f"'{call.name}' ({type(layer).__name__}) is assumed 1-Lipschitz")
    return 1.0, 1.0, "assumed 1-Lipschitz"


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _pool_overlap(layer: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The most windows any one input pixel belongs to (per axis, multiplied)."""
    kernel, stride, padding = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size), _pair(layer.padding)
    dilation = _pair(getattr(layer, "dilation", 1))
    total = 1
    for n, k, s, p, d in zip(input_shape[-2:], kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        n_out = (n + 2 * p - span + (s - 1 if layer.ceil_mode else 0)) // s + 1
        counts = [0] * n
        for o in range(n_out):
            for i in range(k):
                y = o * s - p + i * d
                if 0 <= y < n:
                    counts[y] += 1
        total *= max(counts)
    return total


def _adaptive_overlap(layer: nn.AdaptiveAvgPool2d, input_shape: tuple[int, ...]) -> int:
    total = 1
    for n, out in zip(input_shape[-2:], _pair(layer.output_size)):
        out = n if out is None else out
        counts = [0] * n
        for i in range(out):
            for y in range((i * n) // out, -(-((i + 1) * n) // out)):
                counts[y] += 1
        total *= max(counts)
    return total


# -- the graph ---------------------------------------------------------------------------------------

def _graph_structure(module: nn.Module, assumptions: list[str]) -> tuple[list[dict], str | None]:
    """Gains of the functional ops of an fx graph, and why the product bound fails (or None)."""
    skip = _parametrization_modules(module)
    containers = [(name, m) for name, m in module.named_modules()
                  if m is not module and m not in skip and not _is_leaf(m)
                  and not isinstance(m, (nn.Sequential, WCAHead))]
    if containers:
        names = ", ".join(f"'{name}' ({type(m).__name__})" for name, m in containers[:3])
        assumptions.append(f"the forward of {names} was not analysed: its layers are assumed to run one after another")
    if isinstance(module, fx.GraphModule):
        return _fx_gains(module)
    if not isinstance(module, (nn.Sequential, WCAHead)) and list(module.children()):
        assumptions.append(f"the forward of the model ({type(module).__name__}) was not analysed: its layers "
                           "are assumed to run one after another, with no other operations between them")
    return [], None


def _fx_gains(graph_module: fx.GraphModule) -> tuple[list[dict], str | None]:
    dependent: set[fx.Node] = set()
    rows: list[dict] = []
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
            continue
        if node.op in ("get_attr", "output"):
            continue
        inputs = [arg for arg in node.all_input_nodes if arg in dependent]
        if not inputs:
            continue
        dependent.add(node)
        if len(inputs) > 1:
            return rows, (f"the graph joins two computed values at '{node.name}' (a residual or concat): "
                          "a product of layer norms is not a bound there")
        if node.op == "call_module":
            continue  # its layers were traced with hooks
        gain = _function_gain(graph_module, node, inputs[0])
        if gain is None:
            return rows, f"the operation '{node.name}' ({_target_name(node)}) is not analysed"
        rows.append({"name": node.name, "type": _target_name(node), "l2_gain": gain[0],
                     "linf_gain": gain[0], "basis": gain[1]})
    return rows, None


def _in_graph_order(graph_module: fx.GraphModule, rows: list[dict], graph_rows: list[dict]) -> list[dict]:
    """Traced layer rows and functional-op rows merged in the order of the graph's nodes."""
    order: dict[str, int] = {}
    for index, node in enumerate(graph_module.graph.nodes):
        order[node.name] = index
        if node.op == "call_module":
            order.setdefault(f"module:{node.target}", index)

    functional = {id(row) for row in graph_rows}

    def position(row: dict) -> int:
        if id(row) in functional:
            return order[row["name"]]
        name = row["name"]
        while name:  # a layer inside a called module (e.g. a WCA head) sorts with that module
            if f"module:{name}" in order:
                return order[f"module:{name}"]
            name = name.rpartition(".")[0]
        return -1

    return sorted(rows + graph_rows, key=position)


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _constant(graph_module: fx.GraphModule, arg) -> torch.Tensor | None:
    if isinstance(arg, (int, float)):
        return torch.tensor(float(arg))
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = graph_module
        for part in arg.target.split("."):
            value = getattr(value, part)
        return value.detach() if isinstance(value, torch.Tensor) else None
    return None


def _function_gain(graph_module: fx.GraphModule, node: fx.Node, source: fx.Node) -> tuple[float, str] | None:
    target = node.target
    if target in _SHAPE_FUNCTIONS or (node.op == "call_method" and target in _SHAPE_METHODS):
        return 1.0, "reshape"
    if target is F.pad and node.kwargs.get("mode", "constant") == "constant":
        return 1.0, "constant padding"
    if target in _ONE_LIPSCHITZ_FUNCTIONS or (node.op == "call_method" and target in _ONE_LIPSCHITZ_METHODS):
        return 1.0, "1-Lipschitz activation"
    others = [a for a in node.args if a is not source]
    if len(others) != 1 or len(node.args) != 2:
        return None
    constant = _constant(graph_module, others[0])
    if constant is None:
        return None
    if target in (torch.add, operator.add, torch.sub, operator.sub):
        return 1.0, "shift by a constant"
    if target in (torch.mul, operator.mul):
        return float(constant.abs().max()), "scaling by a constant"
    if target in (torch.div, operator.truediv) and node.args[0] is source:
        return float((1.0 / constant.abs()).max()), "division by a constant"
    return None


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
        lines.append(f"l2 Lipschitz constant   <= {bounds['l2_upper_bound']:.6g}  (upper bound: product of the layers' l2 gains)")
        if bounds["l2_upper_bound_hoelder"] is not None:
            lines.append(f"                        <= {bounds['l2_upper_bound_hoelder']:.6g}  (upper bound: product of sqrt(l1*linf), no power iteration)")
        if bounds["linf_upper_bound"] is not None:
            lines.append(f"linf Lipschitz constant <= {bounds['linf_upper_bound']:.6g}  (upper bound: product of the layers' linf gains)")
    lines += [f"assumed: {a}" for a in bounds["assumptions"]]
    return table, lines
