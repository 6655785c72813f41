"""Certified-training losses that mix an adversarial point into the IBP bound.

- `MTLIBP`     De Palma et al. 2024: (1 - w) * CE(f(x_adv)) + w * L_IBP, x_adv from a short PGD;
               `ExpMTLIBP` interpolates the two losses in log space instead, L_adv^(1-w) * L_IBP^w.
- `SABR`       Mueller et al. 2023: IBP over a small box (radius lambda * eps) around a PGD point of
               the full ball, the box moved (not cut) to lie inside the ball and the input range.

Both keep IBPLoss's step (bound graph, gradient routing, warm-up regularizers) and replace how the
bound and the clean/adversarial terms are combined. The PGD start is the step's start noise (the
slice of the global batch's noise), so a sharded run attacks every sample as one process does.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from certify.attacks.gradient import model_mode
from certify.common.errors import UserError
from harden.training.objectives import IBPLoss, Objective, _GivenStartPGD, make_objective


class _AdversarialIBP(IBPLoss):
    uses_start_noise = True

    def __init__(self, *, steps: int = 10, step_size: float | None = None, **options):
        super().__init__(**options)
        if steps < 1:
            raise UserError(f"--steps {steps} is below 1", "give the number of attack steps, e.g. 3")
        self.steps, self.step_size = steps, step_size

    def adversarial(self, model, x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
        """A PGD point of the step's eps ball, labelled with the true classes (the training loss's);
        the attack needs gradients even where the bound itself is computed without them."""
        with torch.enable_grad():
            return _GivenStartPGD(model, step.eps, start_noise=step.start_noise, norm=self.norm, steps=self.steps,
                                  step_size=self.step_size, lower=self.lower, upper=self.upper)(x, y)

    def describe(self) -> dict:
        return {**super().describe(), "steps": self.steps, "step_size": self.step_size}


class MTLIBP(_AdversarialIBP):
    """The weight `ibp_weight` moves the loss from adversarial training (0) to IBP training (1)."""

    name = "mtl-ibp"

    def __init__(self, *, ibp_weight: float = 0.5, **options):
        super().__init__(**options)
        if not 0.0 <= ibp_weight <= 1.0:
            raise UserError(f"--ibp-weight {ibp_weight} is outside [0, 1]", "give a weight such as 0.5")
        self.ibp_weight = ibp_weight

    def mix(self, adversarial: torch.Tensor, robust: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.ibp_weight) * adversarial + self.ibp_weight * robust

    def combine(self, model, x, y, step, clean, robust, lower):
        logits = model(self.adversarial(model, x, y, step))
        adversarial = F.cross_entropy(logits, y, reduction="none")
        return self.mix(adversarial, robust), (lower > 0).all(dim=1).detach()

    def describe(self) -> dict:
        return {**super().describe(), "ibp_weight": self.ibp_weight}


class ExpMTLIBP(MTLIBP):
    name = "exp-mtl-ibp"

    def mix(self, adversarial, robust):
        # Both are cross-entropies, so positive; the floor keeps log finite on a perfect fit.
        tiny = torch.finfo(robust.dtype).tiny
        return torch.exp((1.0 - self.ibp_weight) * adversarial.clamp_min(tiny).log()
                         + self.ibp_weight * robust.clamp_min(tiny).log())


def small_box(x: torch.Tensor, x_adv: torch.Tensor, eps: float, radius: float, lower: float,
              upper: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of half-width `radius` centred as near x_adv as fits inside the eps ball around x
    and [lower, upper]; where even that does not fit (near the range's edge), the ball's box."""
    ball_lower, ball_upper = (x - eps).clamp(lower, upper), (x + eps).clamp(lower, upper)
    centre = torch.minimum(torch.maximum(x_adv, ball_lower + radius), ball_upper - radius)
    return torch.maximum(centre - radius, ball_lower), torch.minimum(centre + radius, ball_upper)


class SABR(_AdversarialIBP):
    """IBP over the small box; the robust flag of the log is PGD accuracy (the small box's bound
    certifies nothing about the ball)."""

    name = "sabr"

    def __init__(self, *, shrink: float = 0.4, **options):
        super().__init__(**options)
        if self.norm != "inf":
            raise UserError("--train sabr is for the linf norm only", "use --norm inf, or --train ibp for l2")
        if not 0.0 < shrink <= 1.0:
            raise UserError(f"--sabr-shrink {shrink} is outside (0, 1]", "give the small box's share of eps, e.g. 0.4")
        self.shrink = shrink
        self._adversarial_points: torch.Tensor | None = None

    def bounds(self, graph, x, y, step):
        x_adv = self.adversarial(graph.model, x, y, step)
        self._adversarial_points = x_adv
        box_lower, box_upper = small_box(x, x_adv, step.eps, self.shrink * step.eps, self.lower, self.upper)
        lower, _ = graph.box_margins(box_lower, box_upper, y)
        return lower

    def combine(self, model, x, y, step, clean, robust, lower):
        losses, _ = super().combine(model, x, y, step, clean, robust, lower)
        with model_mode(model), torch.no_grad():
            attacked = model(self._adversarial_points).argmax(1) == y
        return losses, attacked

    def describe(self) -> dict:
        return {**super().describe(), "shrink": self.shrink}


EXPRESSIVE = {"mtl-ibp": MTLIBP, "exp-mtl-ibp": ExpMTLIBP, "sabr": SABR}


def make_training_objective(name: str, *, ibp_weight: float = 0.5, sabr_shrink: float = 0.4, **options) -> Objective:
    """harden.training.objectives.make_objective, and this module's objectives by their --train name."""
    if name not in EXPRESSIVE:
        return make_objective(name, **options)
    certified = {key: options[key] for key in ("norm", "input_range", "kappa_end", "warmup_weight", "steps",
                                                "step_size") if key in options}
    extra = {"shrink": sabr_shrink} if name == "sabr" else {"ibp_weight": ibp_weight}
    return EXPRESSIVE[name](input_shape=options["input_shape"], **certified, **extra)
