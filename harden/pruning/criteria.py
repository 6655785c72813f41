"""The pieces of pruning under a condition-number constraint that need no training loop: kappa of a
layer's weight matrix (full and live part), the sparsity schedule, the magnitude masks, the
sparsity and condition loss terms, and one pruning event with its kappa log. harden.pruning.prune
puts them into the training loop.

Loss. L_adv (harden.training.objectives: clean, pgd or trades) + tsc_weight * sum rho_a(|w|) over the masked
weights, rho_a(t) = (a+1) t / (a+t) the transformed-l1 surrogate of l0 (on |w|: the reference
feeds a signed value and gets a pole at w = -a) + cond_weight * sum over layers of Omega(W_hat),
W_hat the masked weight as a C_out x (C_in*kh*kw) matrix (a strided conv's true operator is
rank-deficient, so the reshaped kernel is the matrix whose conditioning is meant). Omega:
  hinge   max(0, log sigma_max - log sigma_min - log kappa_max)^2, torch.linalg.svdvals in float64
          (its gradient is stable even for repeated singular values);
  logdet  (log(1e-5 + det(G / r)))^2, G the r x r Gram matrix of the smaller side, slogdet in
          float64 (the reference's form, which it applies to its final Linear only; r as in the
          reference, the size of G). It pulls det(G/r) to 1 rather than bounding kappa directly,
          and where det(G/r) << 1e-5 (small weights, large r) the 1e-5 dominates and its gradient
          vanishes: e.g. a 784 -> 32 Linear at PyTorch's default init. Kept as the reference has it.

Live part. A row pruned to all zeros (a unit that no longer reads its input) or an all-zero
column makes the full matrix singular, kappa = inf whatever the other weights are. Omega is
therefore taken on the LIVE matrix, without all-zero rows and columns: the map the layer still
computes, and the only thing the weights can condition. If even that is singular (or empty), no
gradient can help: its Omega is left out of the loss and the record lists the layer.

kappa is logged for every pruned layer right before and right after each event, and at the end,
both of the full matrix (numpy's np.linalg.cond; inf when rank-deficient) and of its live part;
all of it is kept in the run's history record in the bundle.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from harden.layers.masks import Mask, prunable_layers, zero_pruned_originals
from harden.layers.norms import condition_number, effective_weight, rank_tolerance

LOGDET_FLOOR = 1e-5  # the reference's 1e-5 inside the log


# -- layers and masks -------------------------------------------------------------------------------


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight as it is; a conv kernel as C_out x (C_in*kh*kw)."""
    return weight.reshape(weight.shape[0], -1)


# kappa of a layer's weight matrix (inf when numerically rank-deficient): one implementation, in norms.
kappa = condition_number


def live_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The weight matrix without its all-zero rows and columns (differentiable in the rest).

    A row pruned to zero is an output unit that no longer depends on the input (a removed neuron
    or channel), a zero column an input nobody reads; the full matrix is then singular by
    construction, kappa = inf whatever the other weights are. The live part is the map the layer
    still computes between the units that remain, and its conditioning is what weights can change."""
    matrix = weight_matrix(weight)
    nonzero = matrix.detach() != 0
    return matrix[nonzero.any(1)][:, nonzero.any(0)]


def live_kappa(weight: torch.Tensor) -> float:
    """`kappa` of the live part (inf when nothing is left or the live part is still singular)."""
    matrix = live_matrix(weight.detach().cpu().to(torch.float64))
    return kappa(matrix) if matrix.numel() else float("inf")


def layer_kappas(model: nn.Module, names: list[str], *, live: bool = False) -> dict[str, float]:
    layers = dict(prunable_layers(model))
    measure = live_kappa if live else kappa
    return {name: measure(effective_weight(layers[name])) for name in names}


def layer_sparsities(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (zeros, entries) of the effective weight."""
    layers = dict(prunable_layers(model))
    out = {}
    for name in names:
        weight = effective_weight(layers[name])
        out[name] = (int((weight == 0).sum()), weight.numel())
    return out


# -- schedule and masks -----------------------------------------------------------------------------

def cubic_sparsity(k: int, events: int, final: float) -> float:
    """s_k = s_f (1 - (1 - k/T)^3): fast at first, when many weights are near zero, slow at the end."""
    return final * (1.0 - (1.0 - k / events) ** 3)


def pruning_events(total_steps: int, final: float, schedule: str, events: int,
                   prune_fraction: float) -> list[tuple[int, float]]:
    """(training step, target sparsity) of each event; the last target is `final` exactly."""
    if schedule == "oneshot":
        return [(0, final)]
    phase = min(total_steps - 1, int(total_steps * prune_fraction))
    return [(((k - 1) * phase) // events, final if k == events else cubic_sparsity(k, events, final))
            for k in range(1, events + 1)]


def magnitude_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], sparsity: float,
                    scope: str) -> dict[str, torch.Tensor]:
    """New masks zeroing exactly round(sparsity * count) entries, globally or per layer: the ones
    already masked first (masks only grow), then the smallest |weight|. Ties break by position."""
    def prune(scores: torch.Tensor, count: int) -> torch.Tensor:
        keep = torch.ones_like(scores, dtype=torch.bool)
        order = torch.argsort(scores, stable=True)
        keep[order[:count]] = False
        return keep

    scores = {name: torch.where(masks[name], weights[name].detach().abs().to(torch.float64),
                                torch.tensor(-1.0, dtype=torch.float64, device=weights[name].device))
              for name in weights}
    if scope == "per-layer":
        return {name: prune(score.flatten(), round(sparsity * score.numel())).view_as(score)
                for name, score in scores.items()}
    flat = torch.cat([score.flatten().cpu() for score in scores.values()])
    keep = prune(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for name, score in scores.items():
        out[name] = keep[start:start + score.numel()].view_as(score).to(score.device)
        start += score.numel()
    return out


# -- loss terms ---------------------------------------------------------------------------------------

def transformed_l1(weight: torch.Tensor, a: float) -> torch.Tensor:
    """sum_i rho_a(|w_i|), rho_a(t) = (a+1) t / (a+t)."""
    t = weight.abs()
    return ((a + 1.0) * t / (a + t)).sum()


def condition_hinge(weight: torch.Tensor, kappa_max: float) -> torch.Tensor | None:
    """max(0, log sigma_max - log sigma_min - log kappa_max)^2 of the live matrix; None when that
    is empty or singular (no gradient can lower its kappa)."""
    matrix = live_matrix(weight).to(torch.float64)
    if matrix.numel() == 0:
        return None
    values = torch.linalg.svdvals(matrix)
    if float(values.detach().min()) <= rank_tolerance(values.detach(), matrix.shape):
        return None
    excess = torch.log(values.max()) - torch.log(values.min()) - math.log(kappa_max)
    return F.relu(excess) ** 2


def condition_logdet(weight: torch.Tensor) -> torch.Tensor | None:
    """(log(1e-5 + det(G / r)))^2, G the r x r Gram matrix of the smaller side of the live
    matrix; None when that is empty or G is singular (slogdet has no gradient there)."""
    matrix = live_matrix(weight).to(torch.float64)
    if matrix.numel() == 0:
        return None
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    sign, logdet = torch.linalg.slogdet(gram / gram.shape[0])
    if float(sign.detach()) <= 0 or not torch.isfinite(logdet.detach()):
        return None
    # log(1e-5 + det) without forming det, which under- or overflows for large r.
    return torch.logaddexp(logdet, torch.tensor(math.log(LOGDET_FLOOR), dtype=logdet.dtype,
                                                device=logdet.device)) ** 2


# -- pruning events ----------------------------------------------------------------------------------

def json_kappa(value: float) -> float | None:
    # JSON has no inf: None stands for a rank-deficient (infinite-kappa) matrix, as in `harden inspect`.
    return value if math.isfinite(value) else None


def prune_event(model: nn.Module, masks: dict[str, Mask], names: list[str], sparsity: float, scope: str) -> dict:
    """One pruning event: the masks grow to `sparsity` (magnitude_masks); returns its log record, with
    every layer's kappa (full and live) right before and right after."""
    layers = dict(prunable_layers(model))
    weights = {name: effective_weight(layers[name]) for name in names}
    before = {name: (kappa(w), live_kappa(w)) for name, w in weights.items()}
    new = magnitude_masks(weights, {name: masks[name].mask for name in names}, sparsity, scope)
    with torch.no_grad():
        for name in names:
            masks[name].mask.copy_(new[name])
    zero_pruned_originals(model)
    after = {name: (kappa(w), live_kappa(w)) for name, w in
             ((name, effective_weight(layers[name])) for name in names)}
    counts = layer_sparsities(model, names)
    return {"target_sparsity": sparsity,
            "sparsity": sum(z for z, _ in counts.values()) / sum(e for _, e in counts.values()),
            "layers": {name: {"sparsity": counts[name][0] / counts[name][1],
                              "kappa_before": json_kappa(before[name][0]), "kappa_after": json_kappa(after[name][0]),
                              "live_kappa_before": json_kappa(before[name][1]),
                              "live_kappa_after": json_kappa(after[name][1])}
                       for name in names}}


def event_line(record: dict, total: int) -> str:
    def shown(value):
        return "inf" if value is None else f"{value:.3g}"

    parts = []
    for name, v in record["layers"].items():
        part = f"{name} {shown(v['kappa_before'])}->{shown(v['kappa_after'])}"
        if v["kappa_after"] is None:
            part += f" (live {shown(v['live_kappa_before'])}->{shown(v['live_kappa_after'])})"
        parts.append(part)
    return (f"  pruning {record['event']}/{total} at step {record['step']}: sparsity {100 * record['sparsity']:.2f}%; "
            f"kappa " + ", ".join(parts))
