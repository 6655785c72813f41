"""Pruning under a condition-number constraint (TSCNC, Feng et al. 2025).

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

Loss and live part: harden.pruning.criteria. The loop is harden.training.loop; this module adds the
pruning events (before the step they are due at), the loss terms and the pruning state of a
checkpoint, so `resume=` and torchrun work as for `harden finetune`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from certify.common.errors import UserError
from certify.common.progress import say
from certify.common.seeds import generator
from certify.data.datasets import Dataset
from harden.io.bundle import Bundle
from harden.training.checkpoint import check_resume, epoch_checkpoint, restore_checkpoint, save_checkpoint
from harden.training.loop import Loop, TrainStep, place_device, start_processes, training_module, wrap_step
from harden.training.objectives import LayerTerms, Step, draw_start, make_objective
from harden.layers.masks import Mask, attach_masks, prunable_layers, zero_pruned_originals
from harden.pruning.criteria import (condition_hinge, condition_logdet, cubic_sparsity, event_line, json_kappa,
                                     kappa, layer_kappas, layer_sparsities, live_kappa, live_matrix, magnitude_masks, pruning_events,
                                     prune_event, transformed_l1, weight_matrix)
from certify.common.errors import is_finite_number
from harden.training.train import check_common_options

SCHEDULES = ("cubic", "oneshot")
SCOPES = ("global", "per-layer")
COND_FORMS = ("hinge", "logdet")
OBJECTIVES = ("clean", "pgd", "trades")
DEFAULT_COND_WEIGHT = {"hinge": 1.0, "logdet": 1e-3}
# The pieces in harden.pruning.criteria stay importable from here (tests, harden inspect).
__all__ = ["PruneConfig", "condition_hinge", "condition_logdet", "cubic_sparsity", "kappa", "layer_kappas",
           "live_kappa", "live_matrix", "magnitude_masks", "objective_from_history", "prune", "pruning_events",
           "transformed_l1", "weight_matrix"]


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

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the checkpoint: all but the evaluation size
        (the epochs too: the pruning events are spread over all the steps)."""
        return {k: v for k, v in asdict(self).items() if k != "eval_limit"}

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

def _condition_term(config: PruneConfig, weight: torch.Tensor) -> torch.Tensor | None:
    if config.cond_form == "hinge":
        return condition_hinge(weight, config.kappa_max)
    return condition_logdet(weight)


def _format_kappa(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.3g}"


@dataclass
class _Pruning:
    """The state of a pruning run that a checkpoint carries beside the weights (masks included)."""
    names: list[str]
    masks: dict[str, Mask]
    events: list[tuple[int, float]]
    next_event: int = 0
    log: list[dict] = field(default_factory=list)
    left_out: set[str] = field(default_factory=set)

    def state(self) -> dict:
        return {"next_event": self.next_event, "prune_events": self.log, "condition_left_out": sorted(self.left_out)}

    def load(self, meta: dict, path) -> None:
        try:
            self.next_event, self.log = int(meta["next_event"]), list(meta["prune_events"])
            self.left_out = {str(name) for name in meta["condition_left_out"]}
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} is not a checkpoint of harden prune (no pruning state)",
                            "give the .ckpt.safetensors file that harden prune wrote") from None


def prune(bundle: Bundle, train: Dataset, test: Dataset | None, config: PruneConfig, *,
          device: str | None = None, checkpoint: str | Path | None = None,
          checkpoint_dir: str | Path | None = None, resume: str | Path | None = None, quiet: bool = False) -> dict:
    """Prune `bundle.module` in place to `config.sparsity`; returns the history record it appends
    to `bundle.history` (events with per-layer kappa before/after, final sparsity and kappa,
    test accuracies). Adds (or updates) the "prune" step of the bundle's recipe.

    `checkpoint`: file rewritten after every epoch (weights, masks, optimizer, RNG and the pruning
    events so far); `checkpoint_dir`: one such file per epoch there; `resume`: such a checkpoint to continue from (same model file, data and settings).
    Under torchrun it runs on every process (DDP), as `finetune` does."""
    from harden.training.finetune import check_data

    input_range = tuple(bundle.data.get("input_range", (0.0, 1.0)))
    config.validate(tuple(bundle.input_shape), input_range)
    dev = place_device(device)  # the one device check, before anything else is read
    check_data(bundle, train, test)
    names = [name for name, _ in prunable_layers(bundle.module)]
    if not names:
        raise UserError("the model has no Conv2d or Linear layer to prune", "pruning works on Conv2d/Linear weights")
    masks = attach_masks(bundle.module, names)
    resumed = check_resume(resume, config, bundle.module, train_samples=len(train)) if resume is not None else None
    processes = start_processes(dev)
    try:
        record = _run(bundle, train, test, config, names, masks, dev, processes, input_range,
                      (checkpoint, checkpoint_dir), resume, resumed, quiet or not processes.main)
    finally:
        processes.close()
    bundle.module.to("cpu").eval()
    _record_step(bundle, names)
    bundle.history.append(record)
    return record


def _run(bundle, train, test, config, names, masks, dev, processes, input_range, checkpoints, resume, resumed,
         quiet) -> dict:
    from harden.training.finetune import FinetuneConfig, evaluate

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    bundle.module.to(dev)
    module = training_module(bundle).to(dev)
    objective = make_objective(config.train, norm=config.norm, input_shape=tuple(bundle.input_shape),
                               input_range=input_range, steps=config.steps)
    terms = LayerTerms()
    optimizer = torch.optim.Adam(bundle.module.parameters(), lr=config.lr)
    start_epoch, epochs_log = 0, []
    n = len(train)
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    pruning = _Pruning(names, masks, pruning_events(config.epochs * steps_per_epoch, config.sparsity,
                                                    config.schedule, config.prune_steps, config.prune_fraction))
    if resumed is not None:
        meta, tensors = resumed
        pruning.load(meta, resume)
        restore_checkpoint(meta, tensors, Path(resume), module=bundle.module, optimizer=optimizer, terms=terms,
                           device=dev)
        start_epoch, epochs_log = int(meta["epoch"]), list(meta["epochs"])
    step = TrainStep(module, objective, lambda: _weight_terms(config, bundle.module, terms, pruning),
                     touch_all=processes.world > 1)
    loop = Loop("prune", wrap_step(step, processes, dev), module, optimizer, train.x, train.y, config.epochs,
                config.batch_size, config.seed, dev, processes, quiet=quiet)
    _prune_hooks(loop, config, objective, bundle, train, terms, pruning, checkpoints, quiet)
    _say_start(config, len(pruning.events), n, dev, processes.world, start_epoch, quiet)
    epochs_log = loop.run(start_epoch, epochs_log)
    processes.barrier()

    record = {"run": "prune", **asdict(config), "cond_weight": config.condition_weight(), "dataset": train.name,
              "train_samples": n, "device": str(dev), "world_size": processes.world, "layers": names,
              "events": pruning.log, "epochs_log": epochs_log, "condition_left_out": sorted(pruning.left_out),
              "resumed_from": str(resume) if resume is not None else None,
              "final": _final_state(bundle.module, names, quiet)}
    if test is not None and processes.main:
        evaluation = FinetuneConfig(train="clean" if config.train == "clean" else "pgd", eps=config.eps,
                                    norm=config.norm, steps=config.steps, seed=config.seed)
        record.update(evaluate(module, test.subset(config.eval_limit), evaluation, input_range,
                               tuple(bundle.input_shape), device=dev))
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _weight_terms(config: PruneConfig, model: nn.Module, terms: LayerTerms, pruning: _Pruning) -> torch.Tensor | None:
    """The layers' own terms + tsc_weight * transformed l1 + cond_weight * Omega, on the masked weights."""
    loss = terms.loss(model)
    if config.tsc_weight <= 0 and not config.condition_on:
        return loss
    layers = dict(prunable_layers(model))
    weights = {name: layers[name].weight for name in pruning.names}
    total = loss if loss is not None else 0.0
    if config.tsc_weight > 0:
        total = total + config.tsc_weight * sum(transformed_l1(w, config.tsc_a) for w in weights.values())
    if config.condition_on:
        omega = [(name, _condition_term(config, w)) for name, w in weights.items()]
        pruning.left_out.update(name for name, term in omega if term is None)
        present = [term for _, term in omega if term is not None]
        if present:
            total = total + config.condition_weight() * torch.stack(present).sum().to(weights[pruning.names[0]].dtype)
    return total if torch.is_tensor(total) else None


def _prune_hooks(loop: Loop, config: PruneConfig, objective, bundle: Bundle, train: Dataset, terms: LayerTerms,
                 pruning: _Pruning, checkpoints: tuple, quiet: bool) -> None:
    """Pruning events before the step they are due at, attack starts at the full eps (stream 1 of
    (seed, epoch)), the progress line and the per-epoch checkpoint of a pruning run."""
    sample_shape = tuple(train.x.shape[1:])
    noise = {}
    world, rank = loop.processes.world, loop.processes.rank

    def step_input(epoch: int, global_step: int, rows: torch.Tensor) -> Step:
        while pruning.next_event < len(pruning.events) and pruning.events[pruning.next_event][0] <= global_step:
            record = prune_event(bundle.module, pruning.masks, pruning.names,
                                  pruning.events[pruning.next_event][1], config.scope)
            record.update({"event": pruning.next_event + 1, "step": global_step})
            pruning.log.append(record)
            pruning.next_event += 1
            say(event_line(record, len(pruning.events)), quiet=quiet)
        start_noise = None
        if objective.uses_start_noise and config.eps > 0:
            generator_ = noise.setdefault(epoch, generator(config.seed, epoch, 1))
            start_noise = draw_start(generator_, (len(rows), *sample_shape), config.norm, config.eps)
            start_noise = start_noise.tensor_split(world)[rank].to(loop.device)
        return Step(config.eps, 1.0, start_noise)

    def status(epoch: int, totals: torch.Tensor) -> str:
        seen = max(totals[3].item(), 1)
        return (f"epoch {epoch + 1}/{config.epochs} loss {totals[0].item() / seen:.3f} "
                f"clean {100 * totals[1].item() / seen:.1f}%")

    checkpoint, checkpoint_dir = checkpoints

    def save(epoch: int, epochs_log: list[dict]) -> None:
        if checkpoint is not None or checkpoint_dir is not None:
            path = epoch_checkpoint(checkpoint_dir, epoch + 1) if checkpoint_dir is not None else Path(checkpoint)
            save_checkpoint(path, module=bundle.module, optimizer=loop.optimizer, terms=terms,
                            epoch=epoch + 1, config=config, epochs_log=epochs_log,
                            extra={"train_samples": len(train), "dataset": train.name,
                                   "world_size": world, **pruning.state()})

    loop.step_input, loop.status, loop.save = step_input, status, save


def _say_start(config: PruneConfig, events: int, n: int, dev, world: int, start_epoch: int, quiet: bool) -> None:
    cond_weight = config.condition_weight()
    constraint = ("none" if not config.condition_on else
                  f"hinge kappa_max {config.kappa_max:g}" if config.cond_form == "hinge" else "logdet (reference form)")
    say(f"prune to {config.sparsity:.2%} ({config.scope}, {config.schedule}, {events} event(s)), "
        f"{config.train} training{f' eps {config.eps:g}' if config.train != 'clean' else ''}, "
        f"condition constraint: {constraint}{f' x{cond_weight:g}' if config.condition_on else ''}, "
        f"tsc {config.tsc_weight:g}; {n} samples, {config.epochs} epochs, {world} process(es) on {dev}"
        + (f"; resuming after epoch {start_epoch}" if start_epoch else ""), quiet=quiet)


def _final_state(model: nn.Module, names: list[str], quiet: bool) -> dict:
    """Sparsity and kappa (full and live) of every pruned layer once training is done."""
    zero_pruned_originals(model)
    final_kappa = layer_kappas(model, names)
    final_live = layer_kappas(model, names, live=True)
    counts = layer_sparsities(model, names)
    zeros, entries = sum(z for z, _ in counts.values()), sum(e for _, e in counts.values())
    say("final: " + ", ".join(f"{name} {100 * counts[name][0] / counts[name][1]:.1f}% kappa "
                              f"{_format_kappa(final_kappa[name])} (live {_format_kappa(final_live[name])})"
                              for name in names), quiet=quiet)
    return {"sparsity": zeros / entries, "zeros": zeros, "entries": entries,
            "per_layer": {name: {"sparsity": counts[name][0] / counts[name][1],
                                 "zeros": counts[name][0], "kappa": json_kappa(final_kappa[name]),
                                 "live_kappa": json_kappa(final_live[name])}
                          for name in names},
            "max_kappa": json_kappa(max(final_kappa.values())),
            "max_live_kappa": json_kappa(max(final_live.values()))}


def _record_step(bundle: Bundle, names: list[str]) -> None:
    """One "prune" recipe step naming the masked layers (the masks themselves are state-dict
    buffers); pruning again updates it instead of adding a second one."""
    step = {"step": "prune", "layers": names}
    for index, existing in enumerate(bundle.recipe):
        if existing.get("step") == "prune":
            bundle.recipe[index] = step
            return
    bundle.recipe.append(step)


