"""Sound lower bounds on classification margins, through auto_LiRPA: our one wrapper around it.

The margin of sample i against class j is `logit_{y_i} - logit_j`. We hand auto_LiRPA the
specification matrix C (one row per j != y_i, +1 at y_i and -1 at j) so that it bounds the margins
directly; bounding the logits and subtracting would be far looser.

`bound_lower` is the one call into auto_LiRPA's `compute_bounds`: the dataset cascade, the
VNN-LIB checks, the benchmarks and harden's certified-training bound graph all go through it, so
they all compute the same bound for the same method name.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from certify.bounds.compat import bounded_module, lirpa
from certify.bounds.lipschitz import LipschitzChain, analyse, lipschitz_lower_bounds

# "lipschitz" (certify.bounds.lipschitz) needs no auto_LiRPA: margins minus Lipschitz constant x eps.
METHODS = ("lipschitz", "ibp", "crown", "alpha-crown")
# Our names -> auto_LiRPA 0.3's method strings: the one method table. "crown-ibp" (CROWN with IBP
# intermediate bounds) is a training objective's bound, not a certification stage.
LIRPA_METHODS = {"ibp": "IBP", "crown": "backward", "alpha-crown": "CROWN-Optimized", "crown-ibp": "CROWN-IBP"}
# Methods whose intermediate bounds get the IBP bounds as reference (see `bound_lower`).
_WITH_IBP_REFERENCE = ("crown", "alpha-crown")


def margin_matrix(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C of shape (N, K-1, K): row k of sample i is e_{y_i} - e_{j_k} over the classes j_k != y_i."""
    n = labels.shape[0]
    others = torch.arange(num_classes, device=labels.device).expand(n, -1)
    others = others[others != labels[:, None]].view(n, num_classes - 1)
    c = torch.zeros(n, num_classes - 1, num_classes, device=labels.device)
    c.scatter_(2, labels.view(n, 1, 1).expand(n, num_classes - 1, 1), 1.0)
    c.scatter_(2, others.unsqueeze(2), -1.0)
    return c


def empirical_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The exact margins of given logits, in the same (N, K-1) layout as the bounds."""
    c = margin_matrix(labels, logits.shape[1]).to(logits.dtype)
    return torch.einsum("nkc,nc->nk", c, logits)


def box_input(x_lower: torch.Tensor, x_upper: torch.Tensor):
    """The box [x_lower, x_upper] as auto_LiRPA's bounded input (centered in the box)."""
    auto_lirpa = lirpa()
    perturbation = auto_lirpa.PerturbationLpNorm(norm=float("inf"), eps=None, x_L=x_lower, x_U=x_upper)
    return auto_lirpa.BoundedTensor((x_lower + x_upper) / 2, perturbation)


def l2_ball_input(centre: torch.Tensor, eps: float):
    """The l2 ball of radius eps around `centre` (unclipped) as auto_LiRPA's bounded input."""
    auto_lirpa = lirpa()
    return auto_lirpa.BoundedTensor(centre, auto_lirpa.PerturbationLpNorm(norm=2.0, eps=eps))


def float32_up(values: torch.Tensor) -> torch.Tensor:
    """`values` in float32, each rounded up: a ball of the rounded radius contains the claimed one."""
    values = torch.as_tensor(values, dtype=torch.float64)
    rounded = values.float()
    return torch.where(rounded.double() < values, torch.nextafter(rounded, torch.tensor(float("inf"))), rounded)


def ball_input(x: torch.Tensor, eps: float, norm: str, lower: float, upper: float):
    """The eps-ball around x (l-infinity: clipped to [lower, upper]; l2: unclipped) as a bounded input."""
    if norm == "inf":
        return box_input((x - eps).clamp(lower, upper), (x + eps).clamp(lower, upper))
    return l2_ball_input(x, eps)


def _ibp_reference(bounded) -> dict:
    return {node.name: (node.lower.detach().clone(), node.upper.detach().clone())
            for node in bounded.modules()
            if getattr(node, "perturbed", False) and node.name != bounded.final_name
            and isinstance(getattr(node, "lower", None), torch.Tensor)
            and isinstance(getattr(node, "upper", None), torch.Tensor)}


def bound_lower(bounded, x, c: torch.Tensor, method: str, *, differentiable: bool = False) -> torch.Tensor:
    """Sound lower bounds (n, rows) of C y over the bounded input x, C of shape (n, rows, outputs).

    CROWN and alpha-CROWN get the IBP bounds of every layer as reference bounds, so each neuron keeps
    the tighter of its IBP and CROWN bounds. Without them auto_LiRPA 0.3 bounds a neuron by CROWN
    whenever it is unstable for ANY sample of the batch, which can be looser than the IBP bound
    that the sample alone would keep, so a batched bound could come out looser than the one-sample
    bound (tests/test_soundness.py checks batched against one-sample bounds). With the reference
    both match or beat the one-sample CROWN bound.

    `differentiable` keeps the graph to the weights (certified training); otherwise the result is
    detached. alpha-CROWN always needs gradients for its own optimisation.
    """
    if method not in LIRPA_METHODS:
        raise ValueError(f"unknown bound method {method!r}; use one of {tuple(LIRPA_METHODS)}")
    reference = None
    if method in _WITH_IBP_REFERENCE:
        with torch.no_grad():
            ibp, _ = bounded.compute_bounds(x=(x,), C=c, method="IBP", bound_upper=False)
            reference = _ibp_reference(bounded)
    with torch.set_grad_enabled(differentiable or method == "alpha-crown"):
        lower, _ = bounded.compute_bounds(x=(x,), C=c, method=LIRPA_METHODS[method], bound_upper=False,
                                          reference_bounds=reference)
    if reference is not None:
        # Every method's bound is sound, so the elementwise best of IBP's and this one is too.
        lower = torch.maximum(lower, ibp)
    return lower if differentiable else lower.detach()


def dropout_as_identity(module: nn.Module) -> nn.Module:
    """`module`, or a copy of it with every Dropout layer replaced by the identity. The network that is
    certified is the eval-mode one, where Dropout is the identity; auto_LiRPA 0.3 instead switches a
    graph with Dropout to training mode and then refuses to bound it."""
    if not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.dropout._DropoutNd):
                setattr(parent, name, nn.Identity())
    return module


class MarginBounder:
    """Bounds the margins of one model over l-infinity boxes or l2 balls, by a Lipschitz margin, IBP,
    CROWN or alpha-CROWN."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], *, device: str | torch.device = "cpu",
                 alpha_iterations: int = 20, with_lirpa: bool = True):
        """`with_lirpa=False` skips auto_LiRPA's graph: only "lipschitz" bounds then, also for layers
        auto_LiRPA cannot bound (an ELU, say)."""
        self.device = torch.device(device)
        self.module = dropout_as_identity(module).eval().to(self.device)
        self.input_shape = tuple(input_shape)
        example = torch.zeros(1, *self.input_shape, device=self.device)
        with torch.no_grad():
            self.num_classes = int(self.module(example).shape[1])
        self.bounded = None if not with_lirpa else bounded_module(
            self.module, example, device=self.device,
            bound_opts={"verbosity": 0, "optimize_bound_args": {"iteration": alpha_iterations}})
        self._lipschitz: LipschitzChain | None = None

    @property
    def lipschitz(self) -> LipschitzChain:
        """The model's Lipschitz chain (or why it has none), read on first use: the operator norms
        cost a second or two, which a cascade without the "lipschitz" stage never pays."""
        if self._lipschitz is None:
            self._lipschitz = analyse(self.module, self.input_shape)
        return self._lipschitz

    def lower_bounds(self, x_lower: torch.Tensor, x_upper: torch.Tensor, c: torch.Tensor,
                     method: str, *, l2_ball: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Sound lower bounds (n, rows) of C y over the boxes [x_lower, x_upper]: the entry point.

        With `l2_ball` = (centres (n, ...), radii (n,)) the bound is over the whole l2 ball of each
        sample instead, not intersected with its box: the ball contains its intersection with the
        box, so a lower bound over the ball holds on every point of the intersection too.
        """
        if method not in METHODS:
            raise ValueError(f"unknown bound method {method!r}; use one of {METHODS}")
        c = c.to(self.device)
        if method == "lipschitz":
            ball = None if l2_ball is None else (l2_ball[0].to(self.device, torch.float32), l2_ball[1])
            return lipschitz_lower_bounds(self.lipschitz, self.module, x_lower.to(self.device),
                                          x_upper.to(self.device), c, l2_ball=ball)
        if self.bounded is None:
            raise ValueError(f"this bounder was made without auto_LiRPA: {method!r} needs it")
        if l2_ball is None:
            x = box_input(x_lower.to(self.device, torch.float32), x_upper.to(self.device, torch.float32))
            return bound_lower(self.bounded, x, c, method)
        centre, radii = l2_ball[0].to(self.device, torch.float32), float32_up(l2_ball[1])
        lower = torch.empty(c.shape[:2], device=self.device)
        # auto_LiRPA 0.3's l2 IBP through a convolution takes one radius for the whole batch: one
        # call per distinct radius (the dataset cascade has one; a radius bisection has several).
        for radius in torch.unique(radii).tolist():
            rows = torch.nonzero(radii == radius).flatten().to(self.device)
            lower[rows] = bound_lower(self.bounded, l2_ball_input(centre[rows], radius), c[rows], method)
        return lower

    def lower_margins(self, x_lower: torch.Tensor, x_upper: torch.Tensor, labels: torch.Tensor,
                      method: str) -> torch.Tensor:
        """Sound lower bounds (N, K-1) of the margins over the boxes [x_lower, x_upper]."""
        return self.lower_bounds(x_lower, x_upper, margin_matrix(labels.to(self.device), self.num_classes), method)


def lower_bounds(bounder: MarginBounder, x_lower: torch.Tensor, x_upper: torch.Tensor, c: torch.Tensor,
                 method: str, *, l2_ball: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`bounder.lower_bounds` as a function (the name the cascade and tests import)."""
    return bounder.lower_bounds(x_lower, x_upper, c, method, l2_ball=l2_ball)
