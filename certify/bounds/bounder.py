"""Sound lower bounds on classification margins, through auto_LiRPA: our one wrapper around it.

The margin of sample i against class j is `logit_{y_i} - logit_j`. We hand auto_LiRPA the
specification matrix C (one row per j != y_i, +1 at y_i and -1 at j) so that it bounds the margins
directly; bounding the logits and subtracting would be far looser.
"""

from __future__ import annotations

import torch
from torch import nn

from certify.bounds.compat import lirpa

METHODS = ("ibp", "crown", "alpha-crown")
# Our names -> auto_LiRPA 0.3's method strings.
_LIRPA_METHOD = {"ibp": "IBP", "crown": "backward", "alpha-crown": "CROWN-Optimized"}


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


class MarginBounder:
    """Bounds the margins of one model over l-infinity boxes, by IBP, CROWN or alpha-CROWN."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], *, device: str | torch.device = "cpu",
                 alpha_iterations: int = 20):
        auto_lirpa = lirpa()
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        self.input_shape = tuple(input_shape)
        example = torch.zeros(1, *self.input_shape, device=self.device)
        with torch.no_grad():
            self.num_classes = int(self.module(example).shape[1])
        self.bounded = auto_lirpa.BoundedModule(
            self.module, example, device=self.device,
            bound_opts={"verbosity": 0, "optimize_bound_args": {"iteration": alpha_iterations}})
        self._perturbation = auto_lirpa.PerturbationLpNorm
        self._bounded_tensor = auto_lirpa.BoundedTensor

    def lower_margins(self, x_lower: torch.Tensor, x_upper: torch.Tensor, labels: torch.Tensor,
                      method: str) -> torch.Tensor:
        """Sound lower bounds (N, K-1) of the margins over the boxes [x_lower, x_upper]."""
        if method not in _LIRPA_METHOD:
            raise ValueError(f"unknown bound method {method!r}; use one of {METHODS}")
        x_lower = x_lower.to(self.device, torch.float32)
        x_upper = x_upper.to(self.device, torch.float32)
        center = (x_lower + x_upper) / 2
        perturbation = self._perturbation(norm=float("inf"), eps=None, x_L=x_lower, x_U=x_upper)
        x = self._bounded_tensor(center, perturbation)
        c = margin_matrix(labels.to(self.device), self.num_classes)
        if method == "alpha-crown":
            lower, _ = self.bounded.compute_bounds(x=(x,), C=c, method=_LIRPA_METHOD[method], bound_upper=False)
        else:
            with torch.no_grad():
                lower, _ = self.bounded.compute_bounds(x=(x,), C=c, method=_LIRPA_METHOD[method], bound_upper=False)
        return lower.detach()
