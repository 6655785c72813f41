"""Bounds for the activations auto_LiRPA 0.3 has none for: Erf (what GELU becomes in ONNX, x * (1 +
erf(x / sqrt 2)) / 2) and ELU. Registered as custom operators by certify.bounds.compat.lirpa(),
so certification and certified training both get them. Build them only through `bound_classes`,
which imports auto_LiRPA's base classes once lirpa() has patched them.

Erf is S-shaped like tanh (convex below 0, concave above, odd, increasing), so it reuses auto_LiRPA's
tangent-line relaxation of tanh with erf and its derivative in place of tanh's. ELU with alpha <= 1
is convex and increasing (slope alpha * e^x <= 1 below 0, 1 above): on [l, u] the chord lies above
it and any tangent below it. ELU with alpha > 1 is not convex near 0 and is refused.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from certify.common.errors import UserError

_TWO_OVER_ROOT_PI = 2.0 / math.sqrt(math.pi)


@functools.lru_cache(maxsize=None)
def bound_classes() -> dict[str, type]:
    """{ONNX op name as auto_LiRPA 0.3 traces it: bound class} for the ops added here."""
    from auto_LiRPA.operators.activation import BoundActivation, BoundTanh

    class BoundErf(BoundTanh):
        def __init__(self, attr, inputs, output_index, options):
            # Skip BoundTanh's own table (of tanh): the one for erf is made here instead.
            super(BoundTanh, self).__init__(attr, inputs, output_index, options)
            self.precompute_relaxation("erf", torch.erf, self.derf)
            self.alpha_batch_dim = 3

        def forward(self, x):
            return torch.erf(x)

        @staticmethod
        def derf(x):
            return _TWO_OVER_ROOT_PI * torch.exp(-x * x)

        def bound_relax(self, x):
            self.bound_relax_impl(x, torch.erf, self.derf)

    class BoundElu(BoundActivation):
        def __init__(self, attr, inputs, output_index, options):
            super().__init__(attr, inputs, output_index, options)
            self.alpha = float(attr.get("alpha", 1.0))
            if not 0 <= self.alpha <= 1:
                raise UserError(f"the model has an ELU with alpha {self.alpha:g}, which is not convex; certify bounds "
                                "ELU with alpha in [0, 1] only", "use nn.ELU(alpha=1.0) (the default), or ReLU")

        def forward(self, x):
            return F.elu(x, self.alpha)

        def derivative(self, x):
            return torch.where(x > 0, torch.ones_like(x), self.alpha * torch.exp(x.clamp(max=0)))

        def bound_relax(self, x):
            lower, upper = x.lower, x.upper
            middle = (lower + upper) / 2
            self.add_linear_relaxation(mask=None, type="lower", k=self.derivative(middle), x0=middle,
                                       y0=self.forward(middle))
            width = upper - lower
            close = width < 1e-6
            # Where the interval is a point (or nearly) the chord's slope is the derivative there.
            chord = torch.where(close, self.derivative(upper),
                                (self.forward(upper) - self.forward(lower)) / width.clamp(min=1e-6))
            self.add_linear_relaxation(mask=None, type="upper", k=chord, x0=lower, y0=self.forward(lower))

    return {"onnx::Erf": BoundErf, "onnx::Elu": BoundElu}
