"""The bounding step of ReLU-split branch and bound, through auto_LiRPA 0.3.

A domain is the input box together with a sign for some ReLU pre-activations z: +1 (z >= 0,
"active") or -1 (z <= 0, "inactive"). Every domain carries its own pre-activation bounds: the
root's, tightened by its split history (lower = 0 for an active split, upper = 0 for an inactive
one). These are handed to auto_LiRPA as fixed intermediate bounds, so a batch of domains costs one
backward pass per optimisation step, and the split constraints themselves enter as beta-CROWN
Lagrangian terms: the ReLU nodes' `sparse_beta` (one multiplier >= 0 per split, optimised with
alpha), `sparse_beta_loc` (the split neuron's flat index in its layer) and `sparse_beta_sign` (the
split's sign; 0 pads the rows of domains with fewer splits). The bound of a domain is a lower bound
of g(x) - sum beta * sign * z(x) over the whole box, which is <= g(x) on the domain: sound for any
beta >= 0 (auto_LiRPA clips beta at 0 after each step). Alpha (any value in [0, 1] is sound) starts
from the parent domain's optimised alpha.

This module has its own BoundedModule: the beta options and the per-node split tensors are state
on the graph that the cascade's bounder must not see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from certify.bounds.bounder import bound_lower, box_input, float32_up, l2_ball_input
from certify.bounds.compat import bounded_module

# An l2 candidate is drawn this much inside the ball, so that float32 rounding keeps it there.
_INSIDE_BALL = 1 - 1e-5


@dataclass
class DomainBatch:
    """Domains of one tree, stacked, on the CPU between steps: per ReLU layer the pre-activation
    bounds (n, neurons), the split signs (n, neurons) in {-1, 0, +1} (int8) and, once the domain
    (or its parent) was optimised, its alpha for the final bound (n, 2, rows, neurons)."""

    lower: list[torch.Tensor]
    upper: list[torch.Tensor]
    splits: list[torch.Tensor]
    alpha: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.lower[0].shape[0]

    def select(self, index: torch.Tensor) -> "DomainBatch":
        alpha = None if self.alpha is None else [t[index] for t in self.alpha]
        return DomainBatch([t[index] for t in self.lower], [t[index] for t in self.upper],
                           [t[index] for t in self.splits], alpha)

    @staticmethod
    def cat(batches: list["DomainBatch"]) -> "DomainBatch":
        names = ["lower", "upper", "splits"] + (["alpha"] if all(b.alpha is not None for b in batches) else [])
        return DomainBatch(*([torch.cat(parts) for parts in zip(*[getattr(b, name) for b in batches])]
                             for name in names))


@dataclass
class StepResult:
    lower: torch.Tensor            # (n, rows): lower bounds of g_r on each domain
    relu_coefficients: list[torch.Tensor]  # per layer (n, rows, neurons): d bound / d relu output
    # (n, rows, *input): the point of the region where each row's linear bound is lowest (a box
    # corner; for a ball, the lowest point of the ball within the box)
    corners: torch.Tensor
    alpha: list[torch.Tensor] | None = None  # per layer (n, 2, rows, neurons): the optimised alpha


class ReluBounding:
    """Bounds batches of ReLU-split domains of one model (see the module docstring)."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], *, device: torch.device,
                 iterations: int = 10):
        self.device = device
        example = torch.zeros(1, *input_shape, device=device)
        self.bounded = bounded_module(
            module, example, device=device,
            bound_opts={"verbosity": 0, "optimize_bound_args": {"iteration": iterations, "lr_alpha": 0.1,
                                                                "lr_beta": 0.05}})
        self.relus = list(self.bounded.relus)
        self.others = sorted({type(node).__name__ for node in self.bounded.optimizable_activations
                              if node not in self.relus})

    @property
    def applicable(self) -> bool:
        """Whether splitting applies: the net has ReLUs and no other optimisable relaxation (Sigmoid,
        Tanh, ...). Max pooling is not among those (certify.bounds.compat keeps its CROWN
        relaxation fixed), so nets with max pooling are searched on their ReLUs."""
        return bool(self.relus) and not self.others

    def set_iterations(self, iterations: int) -> None:
        self.bounded.bound_opts["optimize_bound_args"]["iteration"] = iterations

    def region(self, lower: torch.Tensor, upper: torch.Tensor, n: int, ball: tuple[torch.Tensor, float] | None):
        """n copies of the query's region as auto_LiRPA's bounded input: the box, or the l2 ball
        (radius rounded up to float32, so the ball bounded contains the one asked about)."""
        if ball is None:
            return box_input(lower.expand(n, *lower.shape[1:]).to(self.device),
                             upper.expand(n, *upper.shape[1:]).to(self.device))
        centre, radius = ball
        radius = float(float32_up(torch.tensor([radius], dtype=torch.float64))[0])
        return l2_ball_input(centre.float().expand(n, *centre.shape[1:]).to(self.device), radius)

    def root(self, lower: torch.Tensor, upper: torch.Tensor, c: torch.Tensor, *,
             ball: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, DomainBatch]:
        """alpha-CROWN over the whole region: (lower bounds (rows,), the root domain)."""
        self._clear_splits()
        self._beta(False)
        x = self.region(lower, upper, 1, ball)
        bound = bound_lower(self.bounded, x, c.unsqueeze(0).to(self.device), "alpha-crown")
        pre = [relu.inputs[0] for relu in self.relus]
        lows = [node.lower.detach().reshape(1, -1).cpu() for node in pre]
        highs = [node.upper.detach().reshape(1, -1).cpu() for node in pre]
        splits = [torch.zeros(low.shape, dtype=torch.int8) for low in lows]
        self.shapes = [tuple(node.lower.shape[1:]) for node in pre]
        return bound[0].cpu(), DomainBatch(lows, highs, splits)

    def bound(self, lower: torch.Tensor, upper: torch.Tensor, c: torch.Tensor, domains: DomainBatch,
              *, optimise: bool = True, ball: tuple[torch.Tensor, float] | None = None) -> StepResult:
        """Bounds of every row of c on each domain: alpha-beta-CROWN (`optimise`) or one CROWN pass
        with the same fixed intermediate bounds (the cheap look-ahead of smart branching)."""
        n, dev = len(domains), self.device
        x = self.region(lower, upper, n, ball)
        fixed = {relu.inputs[0].name: (low.to(dev).view(n, *shape), high.to(dev).view(n, *shape))
                 for relu, low, high, shape in zip(self.relus, domains.lower, domains.upper, self.shapes)}
        self._set_splits(domains.splits)
        self._beta(optimise)
        final, root = self.bounded.final_name, self.bounded.input_name[0]
        spec = c.unsqueeze(0).expand(n, -1, -1).to(dev)
        options = self.bounded.bound_opts["optimize_bound_args"]
        if optimise:
            self._init_alpha(x, spec, fixed, domains.alpha)
        options["init_alpha"] = False
        try:
            with torch.set_grad_enabled(optimise):
                bound, _, coefficients = self.bounded.compute_bounds(
                    x=(x,), C=spec, method="CROWN-Optimized" if optimise else "backward",
                    bound_upper=False, intermediate_layer_bounds=fixed, return_A=True,
                    needed_A_dict={final: [root]})
        finally:
            options["init_alpha"] = True
        input_a = coefficients[final][root]["lA"].detach().reshape(n, c.shape[0], -1)
        corners = _lowest_points(input_a, lower.to(dev), upper.to(dev), ball).reshape(n, c.shape[0], *lower.shape[1:])
        relu_a = [relu.lA.detach().reshape(c.shape[0], n, -1).transpose(0, 1).cpu() for relu in self.relus]
        self._clear_splits()
        return StepResult(bound.detach().cpu(), relu_a, corners.cpu(), self._alpha(n, c.shape[0]) if optimise else None)

    def _alpha(self, n: int, rows: int) -> list[torch.Tensor] | None:
        """Each domain's optimised alpha for the final bound (n, 2, rows, neurons) per layer, or None
        where auto_LiRPA kept a sparse alpha (only a full one maps onto the neurons one to one)."""
        final, out = self.bounded.final_name, []
        for relu, neurons in zip(self.relus, self.shapes):
            alpha = relu.alpha.get(final)
            if alpha is None or alpha.shape != (2, rows, n, *neurons):
                return None
            out.append(alpha.detach().reshape(2, rows, n, -1).permute(2, 0, 1, 3).cpu())
        return out

    def _init_alpha(self, x, spec: torch.Tensor, fixed: dict, warm: list[torch.Tensor] | None) -> None:
        """Create the alpha variables by one CROWN pass over the FIXED intermediate bounds (auto_LiRPA's
        own initialisation would first recompute every intermediate layer, and create alphas for
        them that a fixed-bounds optimisation never uses), then start them from the parents' alpha."""
        final = self.bounded.final_name
        self.bounded.init_slope((x,), share_slopes=False, method="backward", c=spec, bound_upper=False,
                                final_node_name=final, intermediate_layer_bounds=fixed)
        if warm is None:
            return
        for relu, start in zip(self.relus, warm):
            alpha = relu.alpha.get(final)
            if alpha is None or alpha.numel() != start.numel():
                return
            alpha.data.copy_(start.to(alpha.device).permute(1, 2, 0, 3).reshape(alpha.shape))

    def _beta(self, enabled: bool) -> None:
        self.bounded.bound_opts["optimize_bound_args"]["enable_beta_crown"] = enabled

    def _set_splits(self, splits: list[torch.Tensor]) -> None:
        for relu, signs in zip(self.relus, splits):
            most = max(int((signs != 0).sum(1).max()), 1)
            # The split neurons of each domain first (a stable sort keeps their order), padding after.
            order = torch.argsort((signs == 0).to(torch.int8), dim=1, stable=True)[:, :most]
            relu.sparse_beta_loc = order.to(self.device)
            relu.sparse_beta_sign = signs.gather(1, order).float().to(self.device)
            relu.sparse_beta = torch.zeros(order.shape, device=self.device, requires_grad=True)

    def _clear_splits(self) -> None:
        for relu in self.relus:
            relu.sparse_beta = relu.sparse_beta_loc = relu.sparse_beta_sign = None


def _lowest_points(input_a: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                   ball: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """(n, rows, inputs): where each linear bound a . x + b is lowest on the region. On a box, the
    corner against the signs of a. On a ball within the box, the minimiser of a . x over their
    intersection is x(t) = clip(centre - t a, box) for the largest t whose point stays in the ball
    (its distance from the centre grows with t): found by bisection, or the box corner when the
    whole box side is in the ball."""
    low, high = lower.reshape(1, 1, -1), upper.reshape(1, 1, -1)
    corner = torch.where(input_a > 0, low, high)
    if ball is None:
        return corner
    centre, radius = ball
    centre, radius = centre.reshape(1, 1, -1).to(input_a), radius * _INSIDE_BALL

    def point(t: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(centre - t * input_a, high), low)

    def inside(t: torch.Tensor) -> torch.Tensor:
        return (point(t) - centre).norm(dim=2, keepdim=True) <= radius

    # From t = radius / ||a|| (the ball's own lowest point, clipping only brings it closer), double
    # t while the point stays inside, then bisect between the last t inside and the first outside.
    low_t = radius / input_a.norm(dim=2, keepdim=True).clamp(min=1e-12)
    high_t = low_t * 2
    for _ in range(60):
        grow = inside(high_t)
        if not bool(grow.any()):
            break
        low_t, high_t = torch.where(grow, high_t, low_t), torch.where(grow, high_t * 2, high_t)
    for _ in range(40):
        middle = (low_t + high_t) / 2
        ok = inside(middle)
        low_t, high_t = torch.where(ok, middle, low_t), torch.where(ok, high_t, middle)
    whole_side = (corner - centre).norm(dim=2, keepdim=True) <= radius
    return torch.where(whole_side, corner, point(low_t))
