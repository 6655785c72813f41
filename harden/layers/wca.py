"""Weight-Covariance Alignment noise (Eustratiadis et al., ICML 2021).

The final Linear `logits = W z + b` of a classifier gets a noise layer in front of it:
`z = h + eps`, `eps = xi @ L^T`, `xi ~ N(0, I)` drawn per example and per forward, so
`eps ~ N(0, Sigma)` with `Sigma = L L^T`. The fine-tuning loss adds `regularizer()` =
`-log tr(W Sigma W^T)`, which rewards noise along the classifier's own directions.

How it sits in a model. `insert_wca` replaces the final Linear by a `WCAHead` at the same place
(attribute of its parent module, so nn.Sequential and torch.fx GraphModules from the ONNX importer
work alike): head(h) = classifier(noise(projection(h))). When the penultimate width is not the noise
dimension D, `projection` (a bias-free Linear to D) is added and the classifier becomes a Linear
from D; both are initialized from an SVD of the old weight so that the network computes exactly
what it did (noise off) whenever rank(W) <= D, which holds for D >= the number of classes.

L is lower-triangular by construction: it is built inside forward from a free D x D matrix, its
strict lower triangle taken as is and its diagonal as softplus(.) + 1e-4, so no optimizer step can
make it non-triangular or its diagonal non-positive (the upper triangle gets no gradient).

The noise is ON in training and evaluation alike (predictions are random). `noise_enabled = False`
turns the head into the deterministic mean network: what `harden export` (deterministic) writes
and what certification bounds, since Gaussian noise is unbounded.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from certify.common.errors import UserError

DEFAULT_NOISE_DIM = 32  # the paper's small networks
# Initial noise: Sigma = INIT_STD^2 I, small against typical penultimate features, so a converted
# model keeps its accuracy with the noise on until fine-tuning grows Sigma through the regularizer.
DEFAULT_INIT_STD = 0.1
DIAGONAL_FLOOR = 1e-4  # keeps diag(L) > 0, hence Sigma positive definite


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class WCANoise(nn.Module):
    """z = h + xi @ L^T with xi ~ N(0, I); identity while `noise_enabled` is False."""

    def __init__(self, dim: int, *, init_std: float = DEFAULT_INIT_STD):
        super().__init__()
        if dim < 1:
            raise UserError(f"the noise dimension must be at least 1, got {dim}", "use e.g. --noise-dim 32")
        if not init_std > DIAGONAL_FLOOR:
            raise UserError(f"the initial noise std must exceed {DIAGONAL_FLOOR}, got {init_std}", "use e.g. 0.1")
        self.dim = int(dim)
        self.noise_enabled = True
        free = torch.zeros(dim, dim)
        free.diagonal().fill_(_inverse_softplus(init_std - DIAGONAL_FLOOR))
        self.free = nn.Parameter(free)
        # Masks, not tril/diag ops: the stochastic ONNX export then needs only Mul/Add/Softplus.
        self.register_buffer("strict_lower", torch.ones(dim, dim).tril(-1), persistent=False)
        self.register_buffer("eye", torch.eye(dim), persistent=False)

    def cholesky_factor(self) -> torch.Tensor:
        """L: lower-triangular with diagonal softplus(free_ii) + 1e-4 > 0."""
        return self.free * self.strict_lower + self.eye * (F.softplus(self.free) + DIAGONAL_FLOOR)

    def covariance(self) -> torch.Tensor:
        """Sigma = L L^T, the covariance of the noise added to each example's features."""
        factor = self.cholesky_factor()
        return factor @ factor.t()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.noise_enabled:
            return h
        return h + torch.randn_like(h) @ self.cholesky_factor().t()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, noise_enabled={self.noise_enabled}"


class WCAHead(nn.Module):
    """The final classifier with the WCA noise before it: classifier(noise(projection(h)))."""

    def __init__(self, in_features: int, num_classes: int, noise_dim: int, *, bias: bool = True,
                 init_std: float = DEFAULT_INIT_STD):
        super().__init__()
        self.projection = nn.Linear(in_features, noise_dim, bias=False) if in_features != noise_dim else None
        self.noise = WCANoise(noise_dim, init_std=init_std)
        self.classifier = nn.Linear(noise_dim, num_classes, bias=bias)

    @property
    def noise_enabled(self) -> bool:
        return self.noise.noise_enabled

    @noise_enabled.setter
    def noise_enabled(self, enabled: bool) -> None:
        self.noise.noise_enabled = bool(enabled)

    def covariance(self) -> torch.Tensor:
        return self.noise.covariance()

    def regularizer(self) -> torch.Tensor:
        """-log tr(W Sigma W^T) = -log ||W L||_F^2, W the classifier weight actually used (after
        any spectral normalization). Differentiable in L and W; add it to the loss."""
        from certify.common.modes import model_mode

        # Reading a spectrally normalized weight in training mode would advance its power
        # iteration a second time per step; the forward pass already did.
        with model_mode(self.classifier):
            weight = self.classifier.weight
        return -torch.log((weight @ self.noise.cholesky_factor()).pow(2).sum())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            h = self.projection(h)
        return self.classifier(self.noise(h))


@contextlib.contextmanager
def noise_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every WCA noise layer of `model` is off: the deterministic mean network."""
    layers = [m for m in model.modules() if isinstance(m, WCANoise)]
    previous = [m.noise_enabled for m in layers]
    for layer in layers:
        layer.noise_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.noise_enabled = state


def wca_heads(model: nn.Module) -> list[tuple[str, WCAHead]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WCAHead)]


def find_logit_layer(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """The name of the nn.Linear that produces the logits: the last Linear called in a forward pass,
    called once, whose output is the model's output (up to reshapes). UserError otherwise."""
    calls: list[tuple[str, torch.Tensor]] = []
    names = {m: name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not names:
        raise UserError("the model has no Linear layer, so there is no final classifier to put the "
                        "WCA noise before", "WCA needs a model that ends in a Linear layer")

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls.append((names[module], output.detach()))

    handles = [m.register_forward_hook(record) for m in names]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    reference = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, *input_shape, generator=generator).to(reference)
    try:
        with torch.no_grad(), noise_disabled(model):
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    if not calls:
        raise UserError("no Linear layer of the model runs in its forward pass", "WCA needs a model that ends in a Linear layer")
    name, output = calls[-1]
    if sum(1 for n, _ in calls if n == name) > 1:
        raise UserError(f"the last Linear layer '{name}' is called several times in the forward pass",
                        "WCA needs one final classifier layer; use separate layers")
    if not (isinstance(logits, torch.Tensor) and output.numel() == logits.numel()
            and torch.equal(output.reshape(logits.shape), logits)):
        raise UserError(f"the model's last Linear layer '{name}' does not produce its logits (something "
                        "follows it)", "WCA goes before a final Linear classifier; remove what follows it")
    return name


def insert_wca(model: nn.Module, *, layer: str, noise_dim: int = DEFAULT_NOISE_DIM,
               init_std: float = DEFAULT_INIT_STD) -> dict:
    """Replace the Linear called `layer` (see `find_logit_layer`) by a WCAHead, in place.

    Returns a record: layer, noise_dim, projection (bool), function_preserved (whether the
    noise-off network computes exactly what the old one did: the SVD factorization is exact when
    rank(W) <= noise_dim)."""
    if noise_dim < 1:
        raise UserError(f"--noise-dim {noise_dim} is below 1", "use e.g. --noise-dim 32")
    if wca_heads(model):
        raise UserError("this model already has a WCA noise layer", "convert the original model instead")
    try:
        linear = model.get_submodule(layer)
    except AttributeError:
        raise UserError(f"the model has no layer '{layer}' for the WCA noise", "the file is damaged; re-create it") from None
    if type(linear) is not nn.Linear:
        raise UserError(f"layer '{layer}' is a {type(linear).__name__}, not a Linear classifier",
                        "WCA goes before a final nn.Linear")
    if parametrize.is_parametrized(linear):
        raise UserError(f"the final layer '{layer}' is already rewritten (spectral norm or pruning)",
                        "add --noise wca in the same convert as the spectral norm, on the original model")
    weight = linear.weight.detach()
    head = WCAHead(linear.in_features, linear.out_features, noise_dim, bias=linear.bias is not None,
                   init_std=init_std).to(device=weight.device, dtype=weight.dtype)
    preserved = _initialize_from(head, linear)
    parent_name, _, child = layer.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, head)
    return {"layer": layer, "noise_dim": int(noise_dim), "projection": head.projection is not None,
            "function_preserved": preserved, "init_std": float(init_std)}


def _initialize_from(head: WCAHead, linear: nn.Linear) -> bool:
    """Set head.projection (P, D x n) and head.classifier (W2, K x D) so that W2 P = W.

    P's rows are the leading right singular vectors of W (zero rows where D > n), so P^T P projects
    onto a space holding W's row space when rank(W) <= D, and W2 = W P^T then gives W2 P = W."""
    with torch.no_grad():
        weight = linear.weight.detach().to(torch.float64)
        if linear.bias is not None:
            head.classifier.bias.copy_(linear.bias)
        if head.projection is None:
            head.classifier.weight.copy_(linear.weight)
            return True
        out_features, in_features = weight.shape
        noise_dim = head.noise.dim
        _, _, vh = torch.linalg.svd(weight, full_matrices=True)  # vh: n x n, rows by singular value
        projection = torch.zeros(noise_dim, in_features, dtype=torch.float64, device=weight.device)
        kept = min(noise_dim, in_features)
        projection[:kept] = vh[:kept]
        head.projection.weight.copy_(projection)
        head.classifier.weight.copy_(weight @ projection.t())
        return min(out_features, in_features) <= kept


def add_wca(model: nn.Module, input_shape: tuple[int, ...], *, noise_dim: int = DEFAULT_NOISE_DIM,
            init_std: float = DEFAULT_INIT_STD) -> dict:
    """Find the final Linear of `model` and put the WCA noise before it (in place); see insert_wca."""
    if wca_heads(model):
        raise UserError("this model already has a WCA noise layer", "convert the original model instead")
    return insert_wca(model, layer=find_logit_layer(model, tuple(input_shape)), noise_dim=noise_dim,
                      init_std=init_std)
