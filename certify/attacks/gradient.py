"""Adversarial attacks: they falsify robustness claims and drive adversarial training.

One small class per attack, all called the same way (`attack(images, labels) -> adversarial images`),
with the common plumbing (loss, projection, random start, model mode) in `Attack`:

- `FGSM`    linf, one step of eps * sign(grad)
- `FGM`     l2, one step of eps * grad / ||grad||_2
- `PGD`     linf or l2, many projected steps, random start, restarts, cross-entropy or margin loss
- `EOTPGD`  PGD whose gradient is the mean over many forward passes of a stochastic model

`find_adversarial` is the certification cascade's falsifier: a margin-loss PGD inside an arbitrary
per-sample box whose hits are confirmed by a plain forward pass.

Every output lies inside the eps ball around the images and inside [lower, upper]; gradients are
taken with `torch.autograd.grad` with respect to the input only, so the model's `.grad` is never
touched. Attacks use the labels they are given: pass the model's own predictions to avoid label
leaking (as the spectral-normalization paper's training attacks do).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from certify.common.errors import UserError
from certify.common.modes import model_mode  # also part of the attacks' API

NORMS = ("inf", "2")
LOSSES = ("ce", "margin")
_NORM_ALIASES = {"inf": "inf", "linf": "inf", "2": "2", "l2": "2"}
# How far the clean images may stray outside [lower, upper] (float noise from normalization).
_RANGE_SLACK = 1e-6


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample max_{j != y} logit_j - logit_y: positive exactly when the sample is misclassified."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.amax(dim=1) - true


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str, targeted: bool = False) -> torch.Tensor:
    """Per-sample loss that the attack maximizes (toward `labels` when targeted, away otherwise)."""
    if loss == "ce":
        value = F.cross_entropy(logits, labels, reduction="none")
    else:
        # The CW margin keeps a useful gradient after the softmax saturates: better for falsification.
        value = margin(logits, labels)
    return -value if targeted else value


def _l2_per_sample(x: torch.Tensor) -> torch.Tensor:
    """||x_i||_2 shaped (N, 1, ..., 1) to broadcast against x."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def _bound(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


class Attack:
    """Common plumbing: model, eps, norm, input range, loss, projection, randomness.

    `lower` / `upper` are floats or tensors broadcastable to the images (e.g. per channel (C, 1, 1)).
    `generator` (a torch.Generator) makes random starts reproducible; without one the global RNG is used.
    """

    def __init__(self, model: nn.Module, eps: float, *, norm: str = "inf", lower=0.0, upper=1.0,
                 loss: str = "ce", targeted: bool = False, generator: torch.Generator | None = None):
        if norm not in _NORM_ALIASES:
            raise UserError(f"unknown attack norm {norm!r}", f"use one of: {', '.join(NORMS)}")
        if loss not in LOSSES:
            raise UserError(f"unknown attack loss {loss!r}", f"use one of: {', '.join(LOSSES)}")
        if not (math.isfinite(eps) and eps >= 0):
            raise UserError(f"attack eps {eps} is not a finite number >= 0", "give an eps such as 0.1")
        if torch.any(torch.as_tensor(lower) > torch.as_tensor(upper)):
            raise UserError("the input range has lower > upper",
                            "give an input range [lower, upper] with lower <= upper")
        self.model = model
        self.eps = float(eps)
        self.norm = _NORM_ALIASES[norm]
        self.lower = lower
        self.upper = upper
        self.loss = loss
        self.targeted = targeted
        self.generator = generator

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.detach()
        labels = labels.detach().to(images.device)
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match {images.shape[0]} images")
        lower, upper = _bound(self.lower, images), _bound(self.upper, images)
        if images.numel() and ((images < lower - _RANGE_SLACK).any() or (images > upper + _RANGE_SLACK).any()):
            raise UserError("images lie outside the attack's input range",
                            "give the input range the data really has (e.g. [0, 1] before normalization)")
        with model_mode(self.model):
            adversarial = self.forward(images, labels)
        return self.project(adversarial, images).detach()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project(self, x_adv: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The point of (eps ball around images) and [lower, upper] nearest x_adv (exact for linf).

        For l2 the ball projection comes first; clipping to the range afterwards only moves
        coordinates toward the (in-range) image, so the result stays inside the ball.
        """
        lower, upper = _bound(self.lower, images), _bound(self.upper, images)
        if self.norm == "inf":
            return torch.minimum(torch.maximum(x_adv, torch.maximum(images - self.eps, lower)),
                                 torch.minimum(images + self.eps, upper))
        delta = x_adv - images
        scale = (self.eps / _l2_per_sample(delta).clamp_min(1e-12)).clamp(max=1.0)
        return torch.minimum(torch.maximum(images + delta * scale, lower), upper)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's decision on x; stochastic attacks override it with an average over draws."""
        return self.model(x)

    def gradient(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """d(sum of per-sample losses)/dx, without touching any parameter's .grad."""
        x = x.detach().requires_grad_(True)
        loss = attack_loss(self.model(x), labels, self.loss, self.targeted).sum()
        (grad,) = torch.autograd.grad(loss, [x])
        return grad

    def succeeded(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.targeted:
            return logits.argmax(dim=1) == labels
        return margin(logits, labels) > 0

    def _step(self, grad: torch.Tensor, size: float) -> torch.Tensor:
        """The steepest-ascent step of the given length in the attack's norm."""
        if self.norm == "inf":
            return size * grad.sign()
        return size * grad / _l2_per_sample(grad).clamp_min(1e-12)

    def _random_start(self, images: torch.Tensor) -> torch.Tensor:
        device = self.generator.device if self.generator is not None else images.device
        if self.norm == "inf":
            noise = torch.rand(images.shape, generator=self.generator, device=device, dtype=images.dtype) * 2 - 1
            delta = noise.to(images.device) * self.eps
        else:
            direction = torch.randn(images.shape, generator=self.generator, device=device, dtype=images.dtype)
            radius = torch.rand((images.shape[0],), generator=self.generator, device=device, dtype=images.dtype)
            direction = direction.to(images.device)
            radius = radius.to(images.device).view(-1, *([1] * (images.dim() - 1)))
            delta = direction / _l2_per_sample(direction).clamp_min(1e-12) * radius * self.eps
        return self.project(images + delta, images)


class _OneStep(Attack):
    """One full step of size eps along the norm's steepest direction (FGSM, FGM)."""

    NORM = "inf"

    def __init__(self, model: nn.Module, eps: float, *, lower=0.0, upper=1.0, loss: str = "ce",
                 targeted: bool = False):
        super().__init__(model, eps, norm=self.NORM, lower=lower, upper=upper, loss=loss, targeted=targeted)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return images + self._step(self.gradient(images, labels), self.eps)


class FGSM(_OneStep):
    """Fast gradient sign method (linf): x + eps * sign(grad), one step."""

    NORM = "inf"


class FGM(_OneStep):
    """Fast gradient method (l2): x + eps * grad / ||grad||_2 per sample, one step."""

    NORM = "2"


class PGD(Attack):
    """Projected gradient descent (Madry et al.) in the linf or l2 ball.

    With several restarts each sample keeps its worst point: a successful restart wins, otherwise
    the one with the highest loss. Samples already fooled are not attacked again by later restarts.
    """

    def __init__(self, model: nn.Module, eps: float, *, norm: str = "inf", steps: int = 10,
                 step_size: float | None = None, random_start: bool = True, restarts: int = 1,
                 loss: str = "ce", lower=0.0, upper=1.0, targeted: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__(model, eps, norm=norm, lower=lower, upper=upper, loss=loss, targeted=targeted,
                         generator=generator)
        if steps < 1 or restarts < 1:
            raise UserError(f"PGD needs steps >= 1 and restarts >= 1 (got {steps}, {restarts})",
                            "give at least one step and one restart")
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise UserError(f"PGD step size {step_size} is not a positive number",
                            "leave it unset for 2.5 * eps / steps")
        self.steps = steps
        # 2.5 * eps / steps lets a run cross the ball and come back (Madry et al.'s rule of thumb).
        self.step_size = step_size if step_size is not None else 2.5 * self.eps / steps
        self.random_start = random_start
        self.restarts = restarts

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        best = images.clone()
        best_loss = torch.full((images.shape[0],), float("-inf"), device=images.device)
        best_success = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        # Without a random start every restart would repeat the first one exactly.
        for _ in range(self.restarts if self.random_start else 1):
            todo = (~best_success).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            x_adv = self._run(images[todo], labels[todo])
            with torch.no_grad():
                logits = self.logits(x_adv)
                loss = attack_loss(logits, labels[todo], self.loss, self.targeted).float()
                success = self.succeeded(logits, labels[todo])
            better = success | (loss > best_loss[todo])
            index = todo[better]
            best[index] = x_adv[better]
            best_loss[index] = loss[better]
            best_success[index] = success[better]
        return best

    def _run(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_adv = self._random_start(images) if self.random_start else images.clone()
        for _ in range(self.steps):
            x_adv = self.project(x_adv + self._step(self.gradient(x_adv, labels), self.step_size), images)
        return x_adv


class EOTPGD(PGD):
    """PGD with Expectation over Transformation: each step's gradient, and the choice among
    restarts, average over `draws` forward passes of a stochastic model (noise on at test time,
    e.g. Weight-Covariance Alignment). One draw per step gives a gradient too noisy to attack with.
    """

    def __init__(self, model: nn.Module, eps: float, *, draws: int = 30, **pgd_options):
        super().__init__(model, eps, **pgd_options)
        if draws < 1:
            raise UserError(f"EOT needs draws >= 1 (got {draws})",
                            "give the number of forward passes per step, e.g. 30")
        self.draws = draws

    def gradient(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x)
        for _ in range(self.draws):
            total += super().gradient(x, labels)
        return total / self.draws

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(x) for _ in range(self.draws)]).mean(dim=0)


def project_l2_box(x: torch.Tensor, centre: torch.Tensor, radii: torch.Tensor, lower: torch.Tensor,
                   upper: torch.Tensor) -> torch.Tensor:
    """x moved into the l2 ball (radius radii[i] around centre[i]) and then clipped to the box.

    The box must contain the centre: clipping then only moves coordinates toward the centre's, so
    the result stays inside the ball. The radius is shrunk by a relative float margin so that
    rounding in the scaling does not leave the point just outside the ball.
    """
    delta = x - centre
    shape = (-1, *([1] * (x.dim() - 1)))
    room = radii.to(x).view(shape) * (1 - 4 * torch.finfo(x.dtype).eps)
    scale = (room / _l2_per_sample(delta).clamp_min(1e-12)).clamp(max=1.0)
    return torch.minimum(torch.maximum(centre + delta * scale, lower), upper)


def in_l2_ball(x: torch.Tensor, centre: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Per sample: ||x - centre||_2 <= radius, computed in float64."""
    return (x.double() - centre.double()).flatten(1).norm(dim=1) <= radii.double().to(x.device)


# Output-diversified restarts (ODI, Tashiro et al. 2020): a random restart first takes this many steps
# of half the box width (half the radius at l2) that push the outputs along a random direction, and
# only then climbs the objective. Plain random starts of a net whose margin is nearly flat around the
# centre all climb the same gentle slope: on VNN-COMP's mnist-net_256x4 (eps 0.05, labels 1) 200
# steps x 50 restarts never leave margin 0.99, while 2 diversifying steps reach a counterexample from
# 1 random start in 5.
DIVERSIFY_STEPS = 2


def search_box(model: nn.Module, start: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
               objective, *, steps: int, restarts: int, seed: int, step_size: float | None = None,
               inclusive: bool = False, l2_ball: tuple[torch.Tensor, torch.Tensor] | None = None,
               diversify_steps: int = DIVERSIFY_STEPS,
               random_start: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The one PGD inside per-sample boxes: sign-gradient ascent of `objective(outputs, rows)` (one
    value per row; `rows` index the batch) until it is > 0 (>= 0 when `inclusive`).

    Returns (found, x): found[i] when the search saw a hit at x[i] (the caller confirms it), x[i]
    inside its box (the last iterate where none was found). The first restart starts at `start`
    clipped into the box, later ones uniformly at random (seeded by `seed`); each random start (and
    `start` too when the caller drew it at random: `random_start`) is then diversified by
    `diversify_steps` output-diversifying steps (see DIVERSIFY_STEPS). The step is per
    coordinate, 2.5 * half-width / steps unless `step_size` is given, so boxes of uneven widths are
    searched evenly. A sample stops as soon as it is hit; a point box is checked once, never stepped.

    With `l2_ball` = (centres, radii) the search is PGD-l2 in the intersection of each ball with its
    box (which must contain the centre): steps of length 2.5 * radius / steps along the normalized
    gradient, every iterate projected by `project_l2_box`.
    """
    generator = torch.Generator().manual_seed(seed)
    if l2_ball is None:
        step = (upper - lower) * (1.25 / steps) if step_size is None else torch.full_like(start, step_size)
        wide_step = (upper - lower) / 2
        project = _box_projection(lower, upper)
    else:
        centre, radii = l2_ball
        size = radii.to(start) * (2.5 / steps) if step_size is None else torch.full_like(radii, step_size).to(start)
        step = size.view(-1, *([1] * (start.dim() - 1))).expand_as(start)
        wide_step = (radii.to(start) / 2).view(-1, *([1] * (start.dim() - 1))).expand_as(start)
        project = _l2_projection(centre, radii, lower, upper)

    def ascent(grad: torch.Tensor) -> torch.Tensor:
        return grad.sign() if l2_ball is None else grad / _l2_per_sample(grad).clamp_min(1e-12)

    found = torch.zeros(start.shape[0], dtype=torch.bool, device=start.device)
    movable = (upper - lower).flatten(1).amax(dim=1) > 0
    x_adv = project(start, torch.arange(start.shape[0], device=start.device))
    with model_mode(model):
        for restart in range(restarts):
            todo = (~found if restart == 0 else ~found & movable).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            lo, hi, size = lower[todo], upper[todo], step[todo]
            if restart == 0:
                x = x_adv[todo]
            else:
                x = lo + torch.rand(lo.shape, generator=generator, dtype=start.dtype).to(start.device) * (hi - lo)
                if l2_ball is not None:
                    x = project(x, todo)
            if restart > 0 or random_start:
                x = _diversify(model, x, todo, wide_step[todo], project, ascent, generator, diversify_steps)
            active = torch.arange(todo.numel(), device=start.device)
            # steps + 1 forward passes: the last one only checks the final iterate.
            for iteration in range(steps + 1):
                xa = x[active].detach().requires_grad_(True)
                value = objective(model(xa), todo[active])
                hit = value.detach() >= 0 if inclusive else value.detach() > 0
                found[todo[active[hit]]] = True
                keep = ~hit & movable[todo[active]]
                if iteration == steps or not keep.any():
                    break
                (grad,) = torch.autograd.grad(value[keep].sum(), [xa])
                active = active[keep]
                x[active] = project(xa.detach()[keep] + size[active] * ascent(grad[keep]), todo[active])
            x_adv[todo] = x.detach()
    return found, x_adv


def _diversify(model: nn.Module, x: torch.Tensor, rows: torch.Tensor, step: torch.Tensor, project, ascent,
               generator: torch.Generator, steps: int) -> torch.Tensor:
    """x after `steps` projected ascent steps on w . model(x), one random w in [-1, 1]^outputs per row."""
    weights = None
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        outputs = model(x).flatten(1)
        if weights is None:
            weights = (torch.rand(outputs.shape, generator=generator, dtype=outputs.dtype) * 2 - 1).to(outputs.device)
        (grad,) = torch.autograd.grad((outputs * weights).sum(), [x])
        x = project(x.detach() + step * ascent(grad), rows)
    return x.detach()


def _box_projection(lower: torch.Tensor, upper: torch.Tensor):
    return lambda x, rows: torch.minimum(torch.maximum(x, lower[rows]), upper[rows])


def _l2_projection(centre: torch.Tensor, radii: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    return lambda x, rows: project_l2_box(x, centre[rows], radii[rows], lower[rows], upper[rows])


def find_adversarial(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, x_lower: torch.Tensor,
                     x_upper: torch.Tensor, *, steps: int = 50, restarts: int = 5, step_size: float | None = None,
                     seed: int = 0, l2_ball: tuple[torch.Tensor, torch.Tensor] | None = None,
                     random_start: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Search the per-sample box [x_lower, x_upper] for misclassified points (`search_box` on the
    margin loss).

    Returns (found, x_adv): found[i] is True only when a plain eval-mode forward pass confirms that
    x_adv[i] is misclassified, and every x_adv[i] lies inside its box. The first restart starts from
    the image clipped into the box, later ones uniformly at random (seeded by `seed`); with `images` a
    random point and `random_start`, the first restart is diversified like the later ones. With
    `l2_ball` = (centres, radii) the search is PGD-l2 in each ball intersected with its box, and
    found[i] also requires x_adv[i] to lie in its ball.
    """
    images = images.detach()
    labels = labels.detach().to(images.device)
    lower = torch.broadcast_to(x_lower.detach().to(images), images.shape)
    upper = torch.broadcast_to(x_upper.detach().to(images), images.shape)
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match {images.shape[0]} images")
    if (lower > upper).any():
        raise ValueError("find_adversarial got a box with x_lower > x_upper")
    if steps < 1 or restarts < 1:
        raise ValueError(f"find_adversarial needs steps >= 1 and restarts >= 1 (got {steps}, {restarts})")
    if l2_ball is not None:
        l2_ball = (l2_ball[0].detach().to(images), torch.as_tensor(l2_ball[1], dtype=torch.float64).to(images.device))
    found, x_adv = search_box(model, images, lower, upper, lambda logits, rows: margin(logits, labels[rows]),
                              steps=steps, restarts=restarts, seed=seed, step_size=step_size, l2_ball=l2_ball,
                              random_start=random_start)
    # Trust nothing the search loop saw: re-check every hit with a plain forward pass.
    with model_mode(model), torch.no_grad():
        hits = found.nonzero().squeeze(1)
        if hits.numel():
            found[hits] = margin(model(x_adv[hits]), labels[hits]) > 0
    inside = ((x_adv >= lower) & (x_adv <= upper)).flatten(1).all(dim=1)
    if l2_ball is not None:
        inside &= in_l2_ball(x_adv, *l2_ball)
    return found & inside, x_adv
