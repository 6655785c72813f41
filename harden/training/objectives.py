"""Training losses for `harden finetune`: one small class per objective, all called the same way.

    objective(model, x, y, step) -> StepResult(losses, clean_correct, robust_correct)

`losses` holds one loss per sample of the (local) batch; the training loop sums and scales them so
that a run sharded over several processes computes exactly the gradient of a one-process run.

- `Clean`     cross-entropy on the clean inputs
- `FGMLoss`   cross-entropy on FGM (l2) / FGSM (linf) points, Farnia et al.'s recipe
- `PGDLoss`   cross-entropy on PGD points (Madry et al.)
- `TRADES`    clean cross-entropy + beta * KL(clean || adversarial), the point maximizing the KL
- `IBPLoss`   kappa * clean CE + (1 - kappa) * CE on the negated IBP lower bounds of the margins
- `CROWNIBP`  the same on beta * CROWN-IBP + (1 - beta) * IBP bounds (Zhang et al. 2020)

MTL-IBP and SABR build on IBPLoss in harden.training.expressive.

Attacks come from `certify.attacks.gradient` and run with the model in eval mode with spectral-norm power
iterations frozen (`model_mode`), so they never move the weights they attack. By default they
label with the model's own prediction (avoids label leaking, as in Farnia et al.); the training
loss always uses the true labels. Bounds come from auto_LiRPA on the margin specification matrix
(`certify.bounds.bounder.margin_matrix`), on a `BoundedModule` built once per model.

`LayerTerms` adds what the model's layers ask for: `regularizer()` of any submodule that has one
(the WCA layer's term) and, when asked, norm decay on the gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from certify.attacks.gradient import FGM, FGSM, PGD, model_mode
from certify.common.errors import UserError
from harden.layers.norm_decay import NormDecay
from harden.training.bound_graph import BoundGraph, bound_loss
from harden.training.recipe import warmup_regularizer

OBJECTIVES = ("clean", "fgm", "pgd", "trades", "ibp", "crown-ibp", "mtl-ibp", "exp-mtl-ibp", "sabr")
CERTIFIED = ("ibp", "crown-ibp", "mtl-ibp", "exp-mtl-ibp", "sabr")
SCHEDULES = ("linear", "smooth")
ATTACK_LABELS = ("predicted", "true")


@dataclass
class Step:
    """What one training step needs to know beyond its batch.

    `eps` is the radius of this step (the eps ramp already applied) and `ramp` how far the ramp
    has gone (0 -> 1): kappa and the CROWN-IBP beta follow it. `start_noise` is the random start of
    this process's samples, cut from noise drawn for the whole global batch, so that a sharded run
    starts every sample where a one-process run does.
    """

    eps: float
    ramp: float = 1.0
    start_noise: torch.Tensor | None = None


@dataclass
class StepResult:
    losses: torch.Tensor                      # (N,) per-sample training loss
    clean_correct: torch.Tensor               # (N,) bool
    robust_correct: torch.Tensor | None = None  # (N,) bool: under the attack, or verified by the bound


def ramp_fraction(step: int, ramp_steps: int) -> float:
    """Fraction of the ramp done after `step` (0-based) steps: reaches 1 at the last ramp step."""
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / ramp_steps)


def eps_at(fraction: float, eps: float, schedule: str = "linear") -> float:
    """eps after `fraction` of the ramp. "smooth" grows as t^4 up to a quarter of the ramp, then
    linearly, joined with a continuous slope (in the spirit of Xu et al. 2020's smoothed ramp):
    the first tiny radii are where IBP training is most fragile."""
    if schedule == "linear":
        return eps * fraction
    midpoint, power = 0.25, 4.0
    scale = 1.0 / (midpoint ** power + power * midpoint ** (power - 1) * (1 - midpoint))
    if fraction < midpoint:
        return eps * scale * fraction ** power
    return eps * scale * (midpoint ** power + power * midpoint ** (power - 1) * (fraction - midpoint))


def draw_start(generator: torch.Generator, shape: tuple[int, ...], norm: str, eps: float) -> torch.Tensor:
    """A uniformly random start inside the eps ball (linf: uniform cube; l2: random direction with
    a uniform radius, as certify.attacks.gradient does), for a whole global batch."""
    if norm == "inf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * eps
    direction = torch.randn(shape, generator=generator)
    radius = torch.rand((shape[0],), generator=generator).view(-1, *([1] * (len(shape) - 1)))
    return direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(radius) * radius * eps


class _GivenStartPGD(PGD):
    """PGD whose random start is handed in (a slice of the global batch's noise) instead of drawn
    here, so that the start of a sample does not depend on how the batch was sharded."""

    def __init__(self, model: nn.Module, eps: float, *, start_noise: torch.Tensor | None, **options):
        super().__init__(model, eps, random_start=start_noise is not None, **options)
        self.start_noise = start_noise

    def _random_start(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(images + self.start_noise.to(images), images)


class _KLPGD(_GivenStartPGD):
    """TRADES' inner maximization: ascend KL(p(x) || p(x')) in x' from a random start."""

    def __init__(self, model: nn.Module, eps: float, *, clean_log_probs: torch.Tensor, **options):
        super().__init__(model, eps, **options)
        self.clean_log_probs = clean_log_probs.detach()

    def gradient(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(self.model(x), dim=1), self.clean_log_probs, log_target=True,
                      reduction="sum")
        (grad,) = torch.autograd.grad(kl, [x])
        return grad


class Objective:
    """Common settings: the norm of the ball and the valid input range."""

    name: ClassVar[str]
    uses_start_noise: ClassVar[bool] = False

    def __init__(self, *, norm: str = "inf", input_range: tuple[float, float] = (0.0, 1.0)):
        if norm not in ("inf", "2"):
            raise UserError(f"unknown --norm {norm!r}", "use inf or 2")
        self.norm = norm
        self.lower, self.upper = float(input_range[0]), float(input_range[1])

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: Step) -> StepResult:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"objective": self.name, "norm": self.norm}


class Clean(Objective):
    name = "clean"

    def __call__(self, model, x, y, step):
        logits = model(x)
        return StepResult(F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) == y)


class _AttackObjective(Objective):
    """Cross-entropy on adversarial points only (both papers' recipe); clean accuracy for the log."""

    def __init__(self, *, attack_labels: str = "predicted", **common):
        super().__init__(**common)
        if attack_labels not in ATTACK_LABELS:
            raise UserError(f"unknown attack labels {attack_labels!r}", f"use one of {', '.join(ATTACK_LABELS)}")
        self.attack_labels = attack_labels

    def attack(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model, x, y, step):
        with model_mode(model), torch.no_grad():
            predictions = model(x).argmax(1)
        labels = predictions if self.attack_labels == "predicted" else y
        x_adv = self.attack(model, x, labels, step) if step.eps > 0 else x
        logits = model(x_adv)
        return StepResult(F.cross_entropy(logits, y, reduction="none"), predictions == y, logits.argmax(1) == y)

    def describe(self) -> dict:
        return {**super().describe(), "attack_labels": self.attack_labels}


class FGMLoss(_AttackObjective):
    """One-step attack: FGM (x + eps g / ||g||_2) for l2, FGSM (x + eps sign g) for linf."""

    name = "fgm"

    def attack(self, model, x, labels, step):
        cls = FGM if self.norm == "2" else FGSM
        return cls(model, step.eps, lower=self.lower, upper=self.upper)(x, labels)


class PGDLoss(_AttackObjective):
    name = "pgd"
    uses_start_noise = True

    def __init__(self, *, steps: int = 10, step_size: float | None = None, random_start: bool = True, **options):
        super().__init__(**options)
        self.steps, self.step_size, self.random_start = steps, step_size, random_start

    def attack(self, model, x, labels, step):
        noise = step.start_noise if self.random_start else None
        return _GivenStartPGD(model, step.eps, start_noise=noise, norm=self.norm, steps=self.steps,
                              step_size=self.step_size, lower=self.lower, upper=self.upper)(x, labels)

    def describe(self) -> dict:
        return {**super().describe(), "steps": self.steps, "step_size": self.step_size,
                "random_start": self.random_start}


class TRADES(Objective):
    """Zhang et al. 2019: CE(f(x), y) + beta * KL(p(x) || p(x')), x' maximizing that KL by PGD."""

    name = "trades"
    uses_start_noise = True

    def __init__(self, *, beta: float = 6.0, steps: int = 10, step_size: float | None = None, **common):
        super().__init__(**common)
        self.beta, self.steps, self.step_size = beta, steps, step_size

    def __call__(self, model, x, y, step):
        with model_mode(model), torch.no_grad():
            clean_log_probs = F.log_softmax(model(x), dim=1)
        if step.eps > 0:
            x_adv = _KLPGD(model, step.eps, clean_log_probs=clean_log_probs, start_noise=step.start_noise,
                           norm=self.norm, steps=self.steps, step_size=self.step_size,
                           lower=self.lower, upper=self.upper)(x, clean_log_probs.argmax(1))
        else:
            x_adv = x
        logits = model(x)
        logits_adv = model(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits, dim=1), log_target=True,
                      reduction="none").sum(1)
        losses = F.cross_entropy(logits, y, reduction="none") + self.beta * kl
        return StepResult(losses, logits.argmax(1) == y, logits_adv.argmax(1) == y)

    def describe(self) -> dict:
        return {**super().describe(), "beta": self.beta, "steps": self.steps, "step_size": self.step_size}


class IBPLoss(Objective):
    """Certified training on IBP bounds (Gowal et al. 2018), kappa * clean + (1 - kappa) * robust,
    kappa going from 1 to `kappa_end` along the eps ramp. `warmup_weight` > 0 adds Shi et al.'s
    warm-up regularizers (harden.training.recipe) while the ramp lasts, fading out with it."""

    name = "ibp"

    def __init__(self, *, input_shape: tuple[int, ...], kappa_end: float = 0.5, warmup_weight: float = 0.0,
                 **common):
        super().__init__(**common)
        if not 0.0 <= kappa_end <= 1.0:
            raise UserError(f"kappa {kappa_end} is outside [0, 1]", "give a final clean-loss weight such as 0.5")
        self.input_shape = tuple(input_shape)
        self.kappa_end = kappa_end
        self.warmup_weight = warmup_weight
        self._graph: BoundGraph | None = None

    def graph(self, model: nn.Module, device: torch.device) -> BoundGraph:
        if self._graph is None or self._graph.model is not model:
            self._graph = BoundGraph(model, self.input_shape, device)
        return self._graph

    def bounds(self, graph: BoundGraph, x: torch.Tensor, y: torch.Tensor, step: Step) -> torch.Tensor:
        lower, _ = graph.lower_margins(x, y, step.eps, self.norm, self.lower, self.upper, "IBP")
        return lower

    def combine(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: Step, clean: torch.Tensor,
                robust: torch.Tensor, lower: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss, per-sample robust flag) from the clean and the bound losses."""
        kappa = 1.0 - (1.0 - self.kappa_end) * step.ramp
        return kappa * clean + (1.0 - kappa) * robust, (lower > 0).all(dim=1).detach()

    def regularizer(self, graph: BoundGraph, step: Step) -> torch.Tensor | None:
        if self.warmup_weight <= 0 or step.ramp >= 1.0:
            return None
        input_box, relu_inputs = graph.input_and_relu_bounds()
        return self.warmup_weight * (1.0 - step.ramp) * warmup_regularizer(input_box, relu_inputs)

    def __call__(self, model, x, y, step):
        graph = self.graph(model, x.device)
        # One evaluation of every parametrized weight per step: one power iteration, shared by the
        # clean forward pass and the weights copied into the bound graph.
        with parametrize.cached():
            logits = model(x)
            clean = F.cross_entropy(logits, y, reduction="none")
            if step.eps <= 0:
                return StepResult(clean, logits.argmax(1) == y, logits.argmax(1) == y)
            effective = graph.refresh()
            lower = self.bounds(graph, x, y, step)
            robust = bound_loss(lower)
            regularizer = self.regularizer(graph, step)
            if effective is not None:
                # Value from the mirror, gradient routed to the real parameters.
                robust = robust.detach() + graph.link(effective, robust.sum(), keep=regularizer is not None) / robust.shape[0]
                if regularizer is not None:
                    regularizer = regularizer.detach() + graph.link(effective, regularizer)
            losses, robust_correct = self.combine(model, x, y, step, clean, robust, lower)
        if regularizer is not None:
            losses = losses + regularizer
        return StepResult(losses, logits.argmax(1) == y, robust_correct)

    def describe(self) -> dict:
        return {**super().describe(), "kappa_end": self.kappa_end, "warmup_weight": self.warmup_weight}


class CROWNIBP(IBPLoss):
    """Zhang et al. 2020: bounds beta * CROWN-IBP + (1 - beta) * IBP, beta going 1 -> 0 along the
    eps ramp (tight CROWN-IBP bounds early, cheap IBP ones once the ramp is done)."""

    name = "crown-ibp"

    def bounds(self, graph, x, y, step):
        beta = 1.0 - step.ramp
        if beta <= 0:
            return super().bounds(graph, x, y, step)
        crown_ibp, ibp = graph.lower_margins(x, y, step.eps, self.norm, self.lower, self.upper, "CROWN-IBP")
        return beta * crown_ibp + (1.0 - beta) * ibp


class LayerTerms:
    """The loss terms and gradient terms that the model's layers call for."""

    def __init__(self, norm_decay: float | None = None, norm_decay_p: str = "inf"):
        self.norm_decay = NormDecay(norm_decay, norm_decay_p) if norm_decay else None

    @staticmethod
    def regularizers(model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if callable(getattr(m, "regularizer", None))]

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        """Sum of every layer's `regularizer()` (e.g. WCA's -log tr(W Sigma W^T)); None if there are none."""
        terms = [m.regularizer() for m in self.regularizers(model)]
        return sum(terms) if terms else None

    def after_backward(self, model: nn.Module) -> None:
        if self.norm_decay is not None:
            self.norm_decay.apply(model)

    def state(self) -> dict[str, torch.Tensor]:
        """Norm decay's momentum averages (they make a resumed run exact)."""
        if self.norm_decay is None:
            return {}
        return {name: value.detach().cpu() for name, value in self.norm_decay._averages.items()}

    def load_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        if self.norm_decay is not None:
            self.norm_decay._averages = {name: value.to(device) for name, value in state.items()}


def make_objective(name: str, *, norm: str = "inf", input_shape: tuple[int, ...], input_range=(0.0, 1.0),
                   steps: int = 10, step_size: float | None = None, attack_labels: str = "predicted",
                   trades_beta: float = 6.0, kappa_end: float = 0.5, random_start: bool = True,
                   warmup_weight: float = 0.0) -> Objective:
    """The objectives of this module; harden.training.expressive.make_training_objective adds its own."""
    common = {"norm": norm, "input_range": tuple(input_range)}
    if name not in OBJECTIVES:
        raise UserError(f"unknown --train {name!r}", f"use one of: {', '.join(OBJECTIVES)}")
    if name in ("pgd", "trades"):
        if steps < 1:
            raise UserError(f"--steps {steps} is below 1", "give the number of attack steps, e.g. 10")
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise UserError(f"attack step size {step_size} is not positive", "leave it unset for 2.5 * eps / steps")
    if name == "clean":
        return Clean(**common)
    if name == "fgm":
        return FGMLoss(attack_labels=attack_labels, **common)
    if name == "pgd":
        return PGDLoss(steps=steps, step_size=step_size, random_start=random_start, attack_labels=attack_labels,
                       **common)
    if name == "trades":
        return TRADES(beta=trades_beta, steps=steps, step_size=step_size, **common)
    if name not in ("ibp", "crown-ibp"):
        raise ValueError(f"{name} is built by harden.training.expressive.make_training_objective")
    return (IBPLoss if name == "ibp" else CROWNIBP)(input_shape=input_shape, kappa_end=kappa_end,
                                                   warmup_weight=warmup_weight, **common)
