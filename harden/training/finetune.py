"""`harden finetune`: adversarial and certified fine-tuning, on one process or many.

The loop: epochs of global batches drawn in a seeded order; each step computes one objective
(harden.training.objectives, harden.training.expressive) plus the terms the model's layers call for,
then Adam. The eps of a step follows a ramp from 0 (linear or smooth): over `eps_ramp_epochs` when
given, otherwise the step plan of harden.training.schedule (clean warm-up and ramp counted in steps,
with step lr decay and gradient clipping); kappa and the CROWN-IBP beta follow the same ramp.

The loop itself (epochs, data order, DDP under torchrun, checkpoints) is harden.training.loop;
this module is its fine-tuning configuration: the eps ramp, the attack starts, the cosine lr.

Repeatability. The data order of an epoch and the attacks' random starts are functions of
(seed, epoch) alone (certify.common.seeds), and every epoch ends with a checkpoint
(harden.training.checkpoint), so `resume=` continues to the very same weights as a run that was
never interrupted.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from certify.attacks.gradient import FGM, FGSM, PGD
from certify.data.datasets import Dataset
from certify.common.errors import UserError
from certify.common.progress import say
from certify.common.seeds import generator
from harden.io.bundle import Bundle
from harden.training.checkpoint import (check_resume, default_checkpoint, epoch_checkpoint, restore_checkpoint,
                                        save_checkpoint)
from harden.training.loop import (Loop, TrainStep, cosine_lr, main_process, place_device, start_processes,
                                  training_module, wrap_step)
from harden.training.bound_graph import BoundGraph
from harden.training.objectives import (ATTACK_LABELS, CERTIFIED, OBJECTIVES, SCHEDULES, LayerTerms, Objective, Step,
                                        draw_start)
from harden.training.expressive import make_training_objective
from harden.training.recipe import WARMUP_WEIGHT, ibp_initialize
from harden.training.schedule import StepPlan, step_decay_lr
from certify.common.errors import is_finite_number as _finite
from harden.training.train import accuracy, check_common_options

LR_SCHEDULES = ("constant", "cosine", "step")
DEFAULT_GRAD_CLIP = 10.0  # Shi et al.'s clip, the default of a planned certified run
# Kept importable from here for the CLI: the checkpoint file names and the rank-0 test.
__all__ = ["FinetuneConfig", "check_data", "check_resume", "default_checkpoint", "epoch_checkpoint", "evaluate",
           "finetune", "main_process"]


@dataclass
class FinetuneConfig:
    train: str = "pgd"
    eps: float = 0.0
    norm: str = "inf"
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    steps: int = 10                     # PGD / TRADES attack steps (and the PGD of the final evaluation)
    step_size: float | None = None      # default 2.5 * eps / steps
    eps_ramp_epochs: float | None = None  # default: a share of the steps for certified objectives (schedule.StepPlan)
    eps_schedule: str = "linear"
    kappa_end: float = 0.5
    attack_labels: str = "predicted"
    trades_beta: float = 6.0
    lr_schedule: str | None = None      # default: step decay for a planned certified run (planned()), else constant
    grad_clip: float | None = None      # largest gradient norm; default 10 for a planned certified run, else none
    shi_recipe: bool = False            # IBP initialization (re-draws the weights) and warm-up regularizers
    ibp_weight: float = 0.5             # mtl-ibp / exp-mtl-ibp: weight of the IBP loss
    sabr_shrink: float = 0.4            # sabr: the small box's radius as a share of eps
    norm_decay: float | None = None
    norm_decay_p: str = "inf"
    eval_limit: int | None = None

    def ramp_epochs(self) -> float | None:
        """The ramp in epochs; None when it is derived from the run's steps (certified objectives)."""
        if self.eps_ramp_epochs is not None:
            return self.eps_ramp_epochs
        return None if self.train in CERTIFIED else 0.0

    def step_plan(self, steps_per_epoch: int) -> StepPlan:
        total = self.epochs * steps_per_epoch
        if self.ramp_epochs() is None:
            return StepPlan.of_run(total)
        return StepPlan(total, 0, round(self.ramp_epochs() * steps_per_epoch))

    def planned(self) -> bool:
        """A certified run with no ramp given: eps ramp, lr decay and gradient clip all follow the
        step plan's defaults (a ramp given in epochs keeps the plain recipe: constant lr, no clip)."""
        return self.train in CERTIFIED and self.eps_ramp_epochs is None

    def lr_schedule_used(self) -> str:
        if self.lr_schedule is not None:
            return self.lr_schedule
        return "step" if self.planned() else "constant"

    def grad_clip_used(self) -> float | None:
        if self.grad_clip is not None:
            return self.grad_clip
        return DEFAULT_GRAD_CLIP if self.planned() else None

    def validate(self, input_shape: tuple[int, ...] | None = None,
                 input_range: tuple[float, float] | None = None) -> None:
        """Refuse any setting that cannot work, with a one-line UserError. Without the model's
        input shape and range (e.g. before the model is loaded) every check but eps's upper bound
        is made; call it again with them."""
        def bad(what: str, hint: str) -> None:
            raise UserError(what, hint)

        if self.train not in OBJECTIVES:
            bad(f"unknown --train {self.train!r}", f"use one of: {', '.join(OBJECTIVES)}")
        if self.norm not in ("inf", "2"):
            bad(f"unknown --norm {self.norm!r}", "use inf or 2")
        if not (_finite(self.eps) and self.eps >= 0):
            bad(f"--eps {self.eps} is not a finite number >= 0", "give the radius in pixel units, e.g. --eps 0.1")
        if self.train == "sabr" and self.norm != "inf":
            bad("--train sabr is for the linf norm only", "use --norm inf, or --train ibp for l2")
        if self.train != "clean" and self.eps == 0:
            bad(f"--train {self.train} needs --eps > 0", "give the radius to train for, e.g. --eps 0.1")
        if input_shape is not None:
            input_range = tuple(input_range) if input_range is not None else (0.0, 1.0)
            width = float(input_range[1]) - float(input_range[0])
            largest = width if self.norm == "inf" else width * math.sqrt(math.prod(input_shape))
            if self.eps > largest:
                bad(f"--eps {self.eps} is larger than the whole input range in the l{self.norm} norm ({largest:g})",
                    f"give 0 < eps <= {largest:g} (pixel units, inputs in [{input_range[0]:g}, {input_range[1]:g}])")
        check_common_options(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                             steps=self.steps, eval_limit=self.eval_limit)
        if self.step_size is not None and not (_finite(self.step_size) and self.step_size > 0):
            bad(f"attack step size {self.step_size} is not positive", "leave it unset for 2.5 * eps / steps")
        if self.eps_ramp_epochs is not None:
            if not (_finite(self.eps_ramp_epochs) and self.eps_ramp_epochs >= 0):
                bad(f"--eps-ramp-epochs {self.eps_ramp_epochs} is not a number >= 0", "give 0 (no ramp) or more epochs")
            if self.eps_ramp_epochs > self.epochs:
                bad(f"--eps-ramp-epochs {self.eps_ramp_epochs:g} is more than --epochs {self.epochs} "
                    f"(eps would never reach {self.eps:g})", f"give at most {self.epochs} ramp epochs, or more --epochs")
        if self.eps_schedule not in SCHEDULES:
            bad(f"unknown --eps-schedule {self.eps_schedule!r}", f"use one of: {', '.join(SCHEDULES)}")
        if self.attack_labels not in ATTACK_LABELS:
            bad(f"unknown attack labels {self.attack_labels!r}", f"use one of: {', '.join(ATTACK_LABELS)}")
        if self.grad_clip is not None and not (_finite(self.grad_clip) and self.grad_clip > 0):
            bad(f"--grad-clip {self.grad_clip} is not a positive number", "give a gradient norm such as 10")
        for what, value, low_open in (("--ibp-weight", self.ibp_weight, False), ("--sabr-shrink", self.sabr_shrink, True)):
            if not (_finite(value) and (0.0 < value if low_open else 0.0 <= value) and value <= 1.0):
                bad(f"{what} {value} is outside {'(0' if low_open else '[0'}, 1]", "give a share such as 0.5")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            bad(f"unknown --lr-schedule {self.lr_schedule!r}", f"use one of: {', '.join(LR_SCHEDULES)}")
        if not (_finite(self.kappa_end) and 0.0 <= self.kappa_end <= 1.0):
            bad(f"kappa {self.kappa_end} is outside [0, 1]", "give a final clean-loss weight such as 0.5")
        if not (_finite(self.trades_beta) and self.trades_beta >= 0):
            bad(f"TRADES beta {self.trades_beta} is not a number >= 0", "use the reference value 6")
        if self.norm_decay is not None and not (_finite(self.norm_decay) and self.norm_decay >= 0):
            bad(f"--norm-decay {self.norm_decay} is not a number >= 0", "use a value in 1e-5..0.1")
        if self.norm_decay_p not in ("inf", "1"):
            bad(f"unknown --norm-decay-p {self.norm_decay_p!r}", "use inf or 1")

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the checkpoint (epochs may grow)."""
        key = {k: v for k, v in asdict(self).items() if k not in ("epochs", "eval_limit", "eps_ramp_epochs")}
        # The default ramp depends on the epochs: compare the ramp actually used (a ramp derived
        # from the steps changes with the epochs, so those cannot grow then).
        derived = self.ramp_epochs() is None or self.lr_schedule_used() == "step"
        return {**key, "eps_ramp_epochs": self.ramp_epochs(), "planned_epochs": self.epochs if derived else None}


# --- the loop ------------------------------------------------------------------------------------

def check_data(bundle: Bundle, train: Dataset, test: Dataset | None = None) -> None:
    """Refuse data the model cannot be trained or evaluated on, before any training step: another
    sample shape, no samples, labels the model has no output for (cross-entropy would fail), or a
    model with another number of outputs than the data has classes (a 100-output model on 10-class
    data is almost surely the wrong model or the wrong data)."""
    hint = "fine-tune the model on the data it was made for"
    for role, data in (("training", train), ("test", test)):
        if data is None:
            continue
        if tuple(data.x.shape[1:]) != tuple(bundle.input_shape):
            raise UserError(f"the {role} data has samples of shape {tuple(data.x.shape[1:])}, the model expects "
                            f"{tuple(bundle.input_shape)}", hint)
        if len(data) == 0:
            if role == "training":
                raise UserError("the training data is empty", "give a dataset with samples (or a larger --limit)")
            continue
        low, high = int(data.y.min()), int(data.y.max())
        if low < 0 or high >= bundle.num_classes:
            label = low if low < 0 else high
            raise UserError(f"the {role} data has label {label} but the model has {bundle.num_classes} outputs "
                            f"(labels 0..{bundle.num_classes - 1})", hint)
    classes = len(train.classes)
    if classes and classes != bundle.num_classes:
        raise UserError(f"the model has {bundle.num_classes} outputs but the data has {classes} classes",
                        hint + " (a .npz without a `classes` array has max(y) + 1 classes; add one naming every class)")


def finetune(bundle: Bundle, train: Dataset, test: Dataset | None, config: FinetuneConfig, *,
             device: str | None = None, checkpoint: str | Path | None = None,
             checkpoint_dir: str | Path | None = None, resume: str | Path | None = None,
             quiet: bool = False) -> dict:
    """Fine-tune `bundle.module` in place; returns the history record it appends to `bundle.history`.

    `checkpoint`: file rewritten after every epoch; `checkpoint_dir`: one file per epoch there.
    `resume`: a checkpoint to continue from (same model file, data and settings; epochs may grow).
    """
    input_range = tuple(bundle.data.get("input_range", (0.0, 1.0)))
    config.validate(tuple(bundle.input_shape), input_range)
    dev = place_device(device)  # the one device check, before anything else is read
    check_data(bundle, train, test)
    resume_meta = resume_tensors = None
    if resume is not None:
        resume_meta, resume_tensors = check_resume(resume, config, bundle.module, train_samples=len(train))

    processes = start_processes(dev)
    quiet = quiet or not processes.main
    try:
        record = _run(bundle, train, test, config, dev, processes, input_range, checkpoint, checkpoint_dir,
                      resume, resume_meta, resume_tensors, quiet)
    finally:
        processes.close()
    bundle.module.to("cpu").eval()
    bundle.history.append(record)
    return record


def _run(bundle, train, test, config, dev, processes, input_range, checkpoint, checkpoint_dir, resume,
         resume_meta, resume_tensors, quiet) -> dict:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    bundle.module.to(dev)
    module = training_module(bundle).to(dev)
    objective = make_training_objective(config.train, norm=config.norm, input_shape=tuple(bundle.input_shape),
                               input_range=input_range, steps=config.steps, step_size=config.step_size,
                               attack_labels=config.attack_labels, trades_beta=config.trades_beta,
                               kappa_end=config.kappa_end, warmup_weight=WARMUP_WEIGHT if config.shi_recipe else 0.0,
                               ibp_weight=config.ibp_weight, sabr_shrink=config.sabr_shrink)
    terms = LayerTerms(config.norm_decay, config.norm_decay_p)
    if config.shi_recipe and resume_meta is None:
        ibp_initialize(bundle.module)
    optimizer = torch.optim.Adam(bundle.module.parameters(), lr=config.lr)
    start_epoch, epochs_log = 0, []
    if resume_meta is not None:
        restore_checkpoint(resume_meta, resume_tensors, Path(resume), module=bundle.module, optimizer=optimizer,
                           terms=terms, device=dev)
        start_epoch, epochs_log = int(resume_meta["epoch"]), list(resume_meta["epochs"])
    step = TrainStep(module, objective, lambda: terms.loss(module), touch_all=processes.world > 1)
    loop = Loop("finetune", wrap_step(step, processes, dev), module, optimizer, train.x, train.y, config.epochs,
                config.batch_size, config.seed, dev, processes, quiet=quiet,
                after_backward=lambda: _after_backward(bundle.module, terms, config.grad_clip_used()))
    _finetune_hooks(loop, config, objective, bundle, train, terms, checkpoint, checkpoint_dir)
    say(f"finetune {config.train} eps {config.eps:g} (l{config.norm}) on {len(train)} samples, {config.epochs} "
        f"epochs, batch {config.batch_size}, {processes.world} process(es) on {dev}"
        + (f"; resuming after epoch {start_epoch}" if start_epoch else ""), quiet=quiet)
    epochs_log = loop.run(start_epoch, epochs_log)
    _converge_spectral_norms(bundle.module)
    processes.barrier()

    record = {"run": "finetune", **asdict(config), "eps_ramp_epochs": config.ramp_epochs(),
              "lr_schedule": config.lr_schedule_used(), "grad_clip": config.grad_clip_used(),
              "step_plan": config.step_plan(loop.steps_per_epoch).describe(),
              "objective": objective.describe(), "dataset": train.name, "train_samples": len(train),
              "world_size": processes.world, "device": str(dev), "epochs_log": epochs_log,
              "resumed_from": str(resume) if resume is not None else None,
              "layer_terms": [type(m).__name__ for m in LayerTerms.regularizers(bundle.module)]}
    if test is not None and processes.main:
        record.update(evaluate(module, test.subset(config.eval_limit), config, input_range,
                               tuple(bundle.input_shape), device=dev))
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _finetune_hooks(loop: Loop, config: FinetuneConfig, objective: Objective, bundle: Bundle, train: Dataset,
                    terms: LayerTerms, checkpoint, checkpoint_dir) -> None:
    """The eps ramp, the attack starts (stream 1 of (seed, epoch)), the cosine lr, the progress line
    and the per-epoch checkpoint of a fine-tuning run."""
    plan = config.step_plan(loop.steps_per_epoch)
    sample_shape = tuple(train.x.shape[1:])
    state = {"epoch": None, "noise": None, "eps": 0.0}
    world, rank = loop.processes.world, loop.processes.rank

    def step_input(epoch: int, global_step: int, rows: torch.Tensor) -> Step:
        if state["epoch"] != epoch:
            state.update(epoch=epoch, noise=generator(config.seed, epoch, 1))
        fraction = plan.ramp(global_step)
        state["eps"] = eps = plan.eps(global_step, config.eps, config.eps_schedule)
        start_noise = None
        if objective.uses_start_noise and eps > 0:
            start_noise = draw_start(state["noise"], (len(rows), *sample_shape), config.norm, eps)
            start_noise = start_noise.tensor_split(world)[rank]
        return Step(eps, fraction, start_noise)

    def status(epoch: int, totals: torch.Tensor) -> str:
        seen = max(totals[3].item(), 1)
        return (f"epoch {epoch + 1}/{config.epochs} eps {state['eps']:.3g} loss {totals[0].item() / seen:.3f} "
                f"clean {100 * totals[1].item() / seen:.1f}% {_robust_name(config)} {100 * totals[2].item() / seen:.1f}%")

    def save(epoch: int, epochs_log: list[dict]) -> None:
        if checkpoint is None and checkpoint_dir is None:
            return
        path = epoch_checkpoint(checkpoint_dir, epoch + 1) if checkpoint_dir is not None else Path(checkpoint)
        save_checkpoint(path, module=bundle.module, optimizer=loop.optimizer, terms=terms, epoch=epoch + 1,
                        config=config, epochs_log=epochs_log,
                        extra={"train_samples": len(train), "dataset": train.name, "world_size": loop.processes.world})

    loop.step_input, loop.status, loop.save = step_input, status, save
    loop.log_entry = lambda epoch: {"eps": state["eps"]}
    schedule = config.lr_schedule_used()
    if schedule == "cosine":
        loop.lr_at = lambda step, total: cosine_lr(config.lr, step, total)
    elif schedule == "step":
        loop.lr_at = lambda step, total: step_decay_lr(config.lr, step, total)


def _after_backward(module: nn.Module, terms: LayerTerms, grad_clip: float | None) -> None:
    terms.after_backward(module)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)


def _converge_spectral_norms(module: nn.Module) -> None:
    """Converge every spectral-norm state once training is done. One power iteration per step
    (the method's default) lags behind the weights when Adam turns the top singular direction, so
    the estimated sigma falls below the true one and the clip lets the operator norm exceed beta
    (benchmarks/spectral_norm.py shows it). Converged, the clip is exact again and the output holds
    sigma <= beta. Done after the last checkpoint (it can take seconds), so a resumed run follows
    the uninterrupted one exactly."""
    from harden.layers.spectral import _parametrization_input, spectral_layers

    # One sample per iteration: on such small products thread hand-offs cost more than the math.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _, layer, sn in spectral_layers(module):
            sn.converge(_parametrization_input(layer, sn))
    finally:
        torch.set_num_threads(threads)


def _robust_name(config: FinetuneConfig) -> str:
    return {"ibp": "verified", "crown-ibp": "verified", "mtl-ibp": "verified", "exp-mtl-ibp": "verified",
            "clean": "-"}.get(config.train, "adv")


def evaluate(module: nn.Module, test: Dataset, config: FinetuneConfig, input_range, input_shape, *,
             device: torch.device, batch_size: int = 500) -> dict:
    """Clean accuracy and the accuracy that the training mode is about, at the full eps: under the
    training attack (fgm), under PGD with the training steps (pgd, trades, clean), or verified by
    IBP (ibp, crown-ibp; `certify` runs the full cascade)."""
    out = {"test_samples": len(test), "test_clean_accuracy": accuracy(module, test, device=device)}
    if config.eps <= 0 or len(test) == 0:
        return out
    lower, upper = input_range
    correct = 0
    if config.train in CERTIFIED:
        graph = BoundGraph(copy.deepcopy(module).eval(), tuple(input_shape), device)
        metric = "ibp-verified"
    elif config.train == "fgm":
        cls = FGM if config.norm == "2" else FGSM
        attack = cls(module, config.eps, lower=lower, upper=upper)
        metric = "fgm" if config.norm == "2" else "fgsm"
    else:
        attack = PGD(module, config.eps, norm=config.norm, steps=config.steps, step_size=config.step_size,
                     lower=lower, upper=upper, generator=torch.Generator().manual_seed(config.seed))
        metric = f"pgd-{config.steps}"
    module.eval()
    for start in range(0, len(test), batch_size):
        x = test.x[start:start + batch_size].to(device)
        y = test.y[start:start + batch_size].to(device)
        if config.train in CERTIFIED:
            with torch.no_grad():
                graph.refresh()
                bound, _ = graph.lower_margins(x, y, config.eps, config.norm, lower, upper, "IBP")
            correct += int((bound > 0).all(dim=1).sum())
            continue
        with torch.no_grad():
            predictions = module(x).argmax(1)
        labels = predictions if config.attack_labels == "predicted" and config.train == "fgm" else y
        x_adv = attack(x, labels)
        with torch.no_grad():
            correct += int((module(x_adv).argmax(1) == y).sum())
    return {**out, "robust_metric": metric, "test_robust_accuracy": correct / len(test)}
