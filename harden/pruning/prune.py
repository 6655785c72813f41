"""Pruning under a condition-number constraint (TSCNC, Feng et al. 2025; methods.md section 4).

Masks. Every Conv2d / Linear weight gets a `Mask` parametrization W -> W * M (M a 0/1 buffer, so
it is in the state dict). It is placed FIRST in the layer's parametrization chain, also on a layer
that already has spectral normalization: the norm then measures and clips the masked weight (a
mask after the norm could raise the operator norm again: zeroing entries can), and the scalar
division keeps the zeros exact. Biases are never pruned. `harden.io.export.baked_module` removes every
parametrization with leave_parametrized=True, so the ONNX initializers hold real zeros.

Schedule. The model comes in trained. T pruning events are spread over the first `prune_fraction`
of the training steps; event k (1..T) sets the sparsity to the cubic s_k = s_f (1 - (1 - k/T)^3)
(Zhu & Gupta), so the last one reaches s_f exactly; the remaining steps fine-tune under the fixed
final mask. `oneshot` is one event at step 0. An event ranks the EFFECTIVE weights (after spectral
norm, i.e. what the network uses) by magnitude -- over all layers at once (global) or within each
layer (per-layer) -- and zeros exactly round(s * count) of them, already-pruned entries first, so
masks only grow and the reached sparsity is exact.

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
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from certify.common.errors import UserError
from certify.common.progress import progress_bar, say
from certify.data.datasets import Dataset
from harden.io.bundle import Bundle
from harden.layers.masks import Mask, attach_masks, prunable_layers, zero_pruned_originals
from harden.layers.norms import condition_number, effective_weight, rank_tolerance
from harden.training.train import check_common_options, is_finite_number

SCHEDULES = ("cubic", "oneshot")
SCOPES = ("global", "per-layer")
COND_FORMS = ("hinge", "logdet")
OBJECTIVES = ("clean", "pgd", "trades")
DEFAULT_COND_WEIGHT = {"hinge": 1.0, "logdet": 1e-3}
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


# -- configuration ------------------------------------------------------------------------------------

@dataclass
class PruneConfig:
    sparsity: float
    schedule: str = "cubic"
    prune_steps: int = 10          # pruning events of the cubic schedule
    prune_fraction: float = 0.5    # share of the training steps over which the events are spread
    scope: str = "global"
    kappa_max: float | None = None
    cond_form: str = "hinge"
    cond_weight: float | None = None   # default: 1 for hinge (when kappa_max is set), 1e-3 for logdet
    tsc_a: float = 100.0
    tsc_weight: float = 0.0
    train: str = "clean"
    eps: float = 0.0
    norm: str = "inf"
    steps: int = 10                # attack steps of pgd / trades (and of the final PGD evaluation)
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    eval_limit: int | None = None

    @property
    def condition_on(self) -> bool:
        return self.condition_weight() > 0

    def condition_weight(self) -> float:
        if self.cond_form == "hinge" and self.kappa_max is None:
            return 0.0
        return DEFAULT_COND_WEIGHT[self.cond_form] if self.cond_weight is None else self.cond_weight

    def validate(self, input_shape: tuple[int, ...] | None = None,
                 input_range: tuple[float, float] | None = None) -> None:
        """Refuse any setting that cannot work (one-line UserError). With the model's input shape
        and range, eps is also checked against the largest distance in the input space."""
        finite = is_finite_number
        if not (finite(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            raise UserError(f"--sparsity {self.sparsity} is outside [0, 1)",
                            "give the fraction of weights to zero, e.g. --sparsity 0.9")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown --schedule {self.schedule!r}", f"use one of: {', '.join(SCHEDULES)}")
        if not (isinstance(self.prune_steps, int) and self.prune_steps >= 1):
            raise UserError(f"--prune-steps {self.prune_steps} is below 1", "give the number of pruning events, e.g. 10")
        if not (finite(self.prune_fraction) and 0.0 < self.prune_fraction <= 1.0):
            raise UserError(f"prune fraction {self.prune_fraction} is outside (0, 1]", "use e.g. 0.5")
        if self.scope not in SCOPES:
            raise UserError(f"unknown pruning scope {self.scope!r}", f"use one of: {', '.join(SCOPES)}")
        if self.kappa_max is not None and not (finite(self.kappa_max) and self.kappa_max > 1.0):
            raise UserError(f"--kappa-max {self.kappa_max} is not above 1 (every matrix has kappa >= 1, "
                            "and only a multiple of an orthogonal one reaches 1)",
                            "give the largest condition number to allow, e.g. --kappa-max 100")
        if self.cond_form not in COND_FORMS:
            raise UserError(f"unknown --cond-form {self.cond_form!r}", f"use one of: {', '.join(COND_FORMS)}")
        if self.cond_weight is not None and not (finite(self.cond_weight) and self.cond_weight >= 0):
            raise UserError(f"--cond-weight {self.cond_weight} is not a number >= 0", "use e.g. 1.0")
        if self.cond_form == "hinge" and self.cond_weight and self.kappa_max is None:
            raise UserError("--cond-weight with the hinge form needs --kappa-max",
                            "give --kappa-max K (or --cond-form logdet for the reference form)")
        if not (finite(self.tsc_a) and self.tsc_a > 0):
            raise UserError(f"--tsc-a {self.tsc_a} is not positive", "use the reference value 100")
        if not (finite(self.tsc_weight) and self.tsc_weight >= 0):
            raise UserError(f"--tsc-weight {self.tsc_weight} is not a number >= 0", "use e.g. 1e-5, or 0 for none")
        if self.train not in OBJECTIVES:
            raise UserError(f"unknown --train {self.train!r} for pruning", f"use one of: {', '.join(OBJECTIVES)}")
        if self.norm not in ("inf", "2"):
            raise UserError(f"unknown --norm {self.norm!r}", "use inf or 2")
        if not (finite(self.eps) and self.eps >= 0):
            raise UserError(f"--eps {self.eps} is not a finite number >= 0", "give the radius in pixel units, e.g. 0.1")
        if self.train != "clean" and self.eps == 0:
            raise UserError(f"--train {self.train} needs --eps > 0", "give the radius to train for, e.g. --eps 0.1")
        if input_shape is not None:
            low, high = tuple(input_range) if input_range is not None else (0.0, 1.0)
            width = float(high) - float(low)
            largest = width if self.norm == "inf" else width * math.sqrt(math.prod(input_shape))
            if self.eps > largest:
                raise UserError(f"--eps {self.eps} is larger than the whole input range in the l{self.norm} norm "
                                f"({largest:g})", f"give 0 < eps <= {largest:g} (pixel units, inputs in "
                                f"[{float(low):g}, {float(high):g}])")
        check_common_options(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                             steps=self.steps, eval_limit=self.eval_limit)


def objective_from_history(bundle: Bundle) -> tuple[str, float, str] | None:
    """(train, eps, norm) of the bundle's last adversarial fine-tuning run, if it had one."""
    for record in reversed(bundle.history):
        if record.get("run") == "finetune" and record.get("train") in ("pgd", "trades") and record.get("eps"):
            return record["train"], float(record["eps"]), record.get("norm", "inf")
    return None


# -- the loop -----------------------------------------------------------------------------------------

def _training_module(bundle: Bundle) -> nn.Module:
    # Attacks work in pixel space: put the model's input normalization (if any) in front.
    from certify.specs.input_spec import InputSpec, with_normalization

    spec = InputSpec(mean=bundle.data.get("mean"), std=bundle.data.get("std"))
    return with_normalization(bundle.module, spec, tuple(bundle.input_shape))


def _condition_term(config: PruneConfig, weight: torch.Tensor) -> torch.Tensor | None:
    if config.cond_form == "hinge":
        return condition_hinge(weight, config.kappa_max)
    return condition_logdet(weight)


def _finite(value: float) -> float | None:
    # JSON has no inf: None stands for a rank-deficient (infinite-kappa) matrix, as in `harden inspect`.
    return value if math.isfinite(value) else None


def _format_kappa(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.3g}"


def prune(bundle: Bundle, train: Dataset, test: Dataset | None, config: PruneConfig, *,
          device: str | None = None, quiet: bool = False) -> dict:
    """Prune `bundle.module` in place to `config.sparsity`; returns the history record it appends
    to `bundle.history` (events with per-layer kappa before/after, final sparsity and kappa,
    test accuracies). Adds (or updates) the "prune" step of the bundle's recipe."""
    from harden.training.finetune import FinetuneConfig, check_data, evaluate
    from harden.training.objectives import LayerTerms, Step, draw_start, make_objective
    from harden.training.train import pick_device

    input_range = tuple(bundle.data.get("input_range", (0.0, 1.0)))
    config.validate(tuple(bundle.input_shape), input_range)
    dev = pick_device(device)
    check_data(bundle, train, test)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    bundle.module.to(dev)
    module = _training_module(bundle).to(dev)
    names = [name for name, _ in prunable_layers(bundle.module)]
    if not names:
        raise UserError("the model has no Conv2d or Linear layer to prune", "pruning works on Conv2d/Linear weights")
    masks = attach_masks(bundle.module, names)
    layers = dict(prunable_layers(bundle.module))
    objective = make_objective(config.train, norm=config.norm, input_shape=tuple(bundle.input_shape),
                               input_range=input_range, steps=config.steps)
    terms = LayerTerms()
    optimizer = torch.optim.Adam(bundle.module.parameters(), lr=config.lr)
    cond_weight = config.condition_weight()

    n, batch = len(train), config.batch_size
    steps_per_epoch = (n + batch - 1) // batch
    total_steps = config.epochs * steps_per_epoch
    events = pruning_events(total_steps, config.sparsity, config.schedule, config.prune_steps, config.prune_fraction)
    sample_shape = tuple(train.x.shape[1:])
    constraint = ("none" if not config.condition_on else
                  f"hinge kappa_max {config.kappa_max:g}" if config.cond_form == "hinge" else "logdet (reference form)")
    say(f"prune to {config.sparsity:.2%} ({config.scope}, {config.schedule}, {len(events)} event(s)), "
        f"{config.train} training{f' eps {config.eps:g}' if config.train != 'clean' else ''}, "
        f"condition constraint: {constraint}{f' x{cond_weight:g}' if config.condition_on else ''}, "
        f"tsc {config.tsc_weight:g}; {n} samples, {config.epochs} epochs on {dev}", quiet=quiet)

    event_log: list[dict] = []
    next_event, left_out = 0, set()
    epochs_log: list[dict] = []
    with progress_bar(quiet=quiet) as bar:
        task = bar.add_task("prune", total=total_steps, status="")
        for epoch in range(config.epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 7_919 + epoch))
            noise = torch.Generator().manual_seed(config.seed * 104_729 + epoch + 1)
            totals = torch.zeros(3, dtype=torch.float64)  # loss sum, clean correct, samples
            for s in range(steps_per_epoch):
                global_step = epoch * steps_per_epoch + s
                while next_event < len(events) and events[next_event][0] <= global_step:
                    record = _prune_event(bundle.module, masks, names, events[next_event][1], config.scope)
                    record.update({"event": next_event + 1, "step": global_step})
                    event_log.append(record)
                    next_event += 1
                    say(_event_line(record, len(events)), quiet=quiet)
                rows = order[s * batch:(s + 1) * batch]
                x, y = train.x[rows].to(dev), train.y[rows].to(dev)
                start_noise = None
                if objective.uses_start_noise and config.eps > 0:
                    start_noise = draw_start(noise, (len(rows), *sample_shape), config.norm, config.eps).to(dev)
                module.train()
                result = objective(module, x, y, Step(config.eps, 1.0, start_noise))
                loss = result.losses.mean()
                extra = terms.loss(bundle.module)
                if extra is not None:
                    loss = loss + extra
                if config.tsc_weight > 0 or config.condition_on:
                    weights = {name: layers[name].weight for name in names}
                    if config.tsc_weight > 0:
                        loss = loss + config.tsc_weight * sum(transformed_l1(w, config.tsc_a) for w in weights.values())
                    if config.condition_on:
                        omega = [(name, _condition_term(config, w)) for name, w in weights.items()]
                        left_out.update(name for name, term in omega if term is None)
                        present = [term for _, term in omega if term is not None]
                        if present:
                            loss = loss + cond_weight * torch.stack(present).sum().to(loss.dtype)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals += torch.tensor([float(result.losses.detach().sum()), float(result.clean_correct.sum()),
                                        len(rows)], dtype=torch.float64)
                seen = max(totals[2].item(), 1)
                bar.update(task, advance=1, status=(
                    f"epoch {epoch + 1}/{config.epochs} loss {totals[0].item() / seen:.3f} "
                    f"clean {100 * totals[1].item() / seen:.1f}%"))
            epochs_log.append({"epoch": epoch + 1, "loss": totals[0].item() / max(totals[2].item(), 1),
                               "train_clean_accuracy": totals[1].item() / max(totals[2].item(), 1)})

    zero_pruned_originals(bundle.module)
    final_kappa = layer_kappas(bundle.module, names)
    final_live = layer_kappas(bundle.module, names, live=True)
    counts = layer_sparsities(bundle.module, names)
    zeros, entries = sum(z for z, _ in counts.values()), sum(e for _, e in counts.values())
    record = {"run": "prune", **asdict(config), "cond_weight": cond_weight, "dataset": train.name,
              "train_samples": n, "device": str(dev), "layers": names, "events": event_log,
              "epochs_log": epochs_log, "condition_left_out": sorted(left_out),
              "final": {"sparsity": zeros / entries, "zeros": zeros, "entries": entries,
                        "per_layer": {name: {"sparsity": counts[name][0] / counts[name][1],
                                             "zeros": counts[name][0], "kappa": _finite(final_kappa[name]),
                                             "live_kappa": _finite(final_live[name])}
                                      for name in names},
                        "max_kappa": _finite(max(final_kappa.values())),
                        "max_live_kappa": _finite(max(final_live.values()))}}
    if test is not None:
        evaluation = FinetuneConfig(train="clean" if config.train == "clean" else "pgd", eps=config.eps,
                                    norm=config.norm, steps=config.steps, seed=config.seed)
        record.update(evaluate(module, test.subset(config.eval_limit), evaluation, input_range,
                               tuple(bundle.input_shape), device=dev))
    record["seconds"] = round(time.perf_counter() - started, 1)
    bundle.module.to("cpu").eval()
    _record_step(bundle, names)
    bundle.history.append(record)
    say("final: " + ", ".join(f"{name} {100 * counts[name][0] / counts[name][1]:.1f}% kappa "
                              f"{_format_kappa(final_kappa[name])} (live {_format_kappa(final_live[name])})"
                              for name in names), quiet=quiet)
    return record


def _prune_event(model: nn.Module, masks: dict[str, Mask], names: list[str], sparsity: float, scope: str) -> dict:
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
                              "kappa_before": _finite(before[name][0]), "kappa_after": _finite(after[name][0]),
                              "live_kappa_before": _finite(before[name][1]),
                              "live_kappa_after": _finite(after[name][1])}
                       for name in names}}


def _event_line(record: dict, total: int) -> str:
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


def _record_step(bundle: Bundle, names: list[str]) -> None:
    """One "prune" recipe step naming the masked layers (the masks themselves are state-dict
    buffers); pruning again updates it instead of adding a second one."""
    step = {"step": "prune", "layers": names}
    for index, existing in enumerate(bundle.recipe):
        if existing.get("step") == "prune":
            bundle.recipe[index] = step
            return
    bundle.recipe.append(step)


