"""Exact operator norms of Conv2d / Linear layers (harden.layers.norm_decay shrinks them).

A conv layer is a linear map on one input sample (C_in x H x W). Its norms are those of that map,
with its stride, padding, dilation and groups, on its real input size -- not the norms of the
kernel reshaped to C_out x (C_in*k*k). `ConvOperator` and `LinearOperator` are the two maps (apply
and adjoint); `power_iteration` runs on either and is shared with `harden.layers.spectral`.

The l1 and linf norms are exact and cheap: with zero padding every matrix entry is one kernel tap,
so a column (row) sum is a sum of |K| over the taps that reach that input pixel (output pixel).
Those tap sets are enumerated per axis from (H, W, k, s, p, dilation) below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from certify.common.errors import UserError

# nn.Conv2d's padding_mode -> F.pad's mode.
_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


@dataclass(frozen=True)
class ConvOperator:
    """The linear map x -> conv2d(x, W) without bias on inputs of shape 1 x C_in x H x W."""

    in_channels: int
    input_hw: tuple[int, int]
    kernel_hw: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pads: tuple[int, int, int, int]  # F.pad order: left, right, top, bottom ('same' can be uneven)
    padding_mode: str

    @classmethod
    def of(cls, conv: nn.Conv2d, input_hw: tuple[int, int]) -> "ConvOperator":
        if not isinstance(conv, nn.Conv2d):
            raise UserError(f"expected an nn.Conv2d, got {type(conv).__name__}",
                            "only Conv2d and Linear layers have operator norms here")
        hw = (int(input_hw[0]), int(input_hw[1]))
        op = cls(conv.in_channels, hw, tuple(conv.kernel_size), tuple(conv.stride),
                 tuple(conv.dilation), conv.groups,
                 tuple(int(p) for p in conv._reversed_padding_repeated_twice), conv.padding_mode)
        if min(op.output_hw) < 1:
            raise UserError(f"input {hw[0]}x{hw[1]} is too small for this conv layer "
                            f"(kernel {op.kernel_hw}, dilation {op.dilation}, padding {op.pads})",
                            "give the layer's real input size")
        return op

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, self.in_channels, *self.input_hw)

    @property
    def padded_hw(self) -> tuple[int, int]:
        left, right, top, bottom = self.pads
        return self.input_hw[0] + top + bottom, self.input_hw[1] + left + right

    @property
    def output_hw(self) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (n - d * (k - 1) - 1) // s + 1
            for n, k, s, d in zip(self.padded_hw, self.kernel_hw, self.stride, self.dilation))

    @property
    def zero_padded(self) -> bool:
        return self.padding_mode == "zeros" or not any(self.pads)

    def _even(self) -> bool:
        left, right, top, bottom = self.pads
        return left == right and top == bottom

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.zero_padded and self._even():
            return F.conv2d(x, weight, None, self.stride, (self.pads[2], self.pads[0]),
                            self.dilation, self.groups)
        mode = _PAD_MODE[self.padding_mode] if not self.zero_padded else "constant"
        return F.conv2d(F.pad(x, self.pads, mode=mode), weight, None, self.stride, 0,
                        self.dilation, self.groups)

    def adjoint(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.zero_padded:
            # reflect/replicate/circular padding folds border taps back inside: its adjoint is the
            # vector-Jacobian product of the (linear) forward map, exact and cheap.
            with torch.enable_grad():
                x = torch.zeros(self.input_shape, dtype=y.dtype, device=y.device, requires_grad=True)
                (grad,) = torch.autograd.grad(self.apply(x, weight.detach()), x, y)
            return grad
        # output_padding makes conv_transpose2d return exactly the (padded) input size.
        extra = tuple(n - ((o - 1) * s + d * (k - 1) + 1) for n, o, s, d, k in
                      zip(self.padded_hw, self.output_hw, self.stride, self.dilation, self.kernel_hw))
        left, _, top, _ = self.pads
        if self._even():
            return F.conv_transpose2d(y, weight, None, self.stride, (top, left), extra,
                                      self.groups, self.dilation)
        full = F.conv_transpose2d(y, weight, None, self.stride, 0, extra, self.groups, self.dilation)
        return full[..., top:top + self.input_hw[0], left:left + self.input_hw[1]]


@dataclass(frozen=True)
class LinearOperator:
    """The map x -> W x on one input vector."""

    in_features: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_features,)

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight @ x

    def adjoint(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() @ y


Operator = ConvOperator | LinearOperator


def layer_operator(layer: nn.Module, input_hw: tuple[int, int] | None = None) -> Operator:
    if isinstance(layer, nn.Linear):
        return LinearOperator(layer.in_features)
    if isinstance(layer, nn.Conv2d):
        if input_hw is None:
            raise UserError("the norm of a conv layer depends on its input size, and none was given",
                            "pass input_hw=(H, W), the layer's real input size")
        return ConvOperator.of(layer, input_hw)
    raise UserError(f"layer type {type(layer).__name__} has no operator norm here",
                    "use nn.Conv2d or nn.Linear layers")


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer really uses (after any parametrization), read without side effects.

    Eval mode first: a spectral-norm parametrization advances its power iteration in training mode.
    """
    modes = {module: module.training for module in layer.modules()}
    layer.eval()
    try:
        with torch.no_grad():
            return layer.weight.detach().clone()
    finally:
        for module, mode in modes.items():
            module.training = mode


def power_iteration(op: Operator, weight: torch.Tensor, u: torch.Tensor, *, iters: int,
                    tol: float = 0.0) -> tuple[float, torch.Tensor, int]:
    """Power iteration on A^T A. Returns (sigma, u, steps) with sigma = ||A u|| for the returned
    unit vector u: a lower bound on the operator norm that rises to it.

    Stops after `iters` steps or once the estimated distance to the limit is below `tol` (relative).
    That estimate is the larger of the last step's change and its geometric extrapolation
    change * q / (1 - q), q the ratio of the last two changes: when the top singular values are
    close, sigma creeps up by tiny steps for a long time, and the bare step size would stop far short.
    """
    with torch.no_grad():
        u = u / u.norm().clamp_min(torch.finfo(u.dtype).tiny)
        out = op.apply(u, weight)
        sigma = float(out.norm())
        steps, last_change = 0, float("inf")
        while steps < iters and sigma > 0.0:
            back = op.adjoint(out / sigma, weight)
            back_norm = float(back.norm())
            if back_norm == 0.0:
                break
            u = back / back_norm
            out = op.apply(u, weight)
            previous, sigma = sigma, float(out.norm())
            steps += 1
            change = abs(sigma - previous)
            ratio = change / last_change if last_change > 0.0 else 0.0
            remaining = max(change, change * ratio / (1.0 - ratio)) if ratio < 1.0 else float("inf")
            if change == 0.0 or remaining <= tol * sigma:
                break
            last_change = change
    return sigma, u, steps


def power_steps(op: Operator, weight: torch.Tensor, u: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` plain power-iteration steps from u, with no host synchronisation (for the per-batch
    update during training). A zero operator leaves u where it was."""
    with torch.no_grad():
        for _ in range(steps):
            out = op.apply(u, weight)
            out = out / out.norm().clamp_min(torch.finfo(out.dtype).tiny)
            back = op.adjoint(out, weight)
            back_norm = back.norm()
            u = torch.where(back_norm > 0, back / back_norm.clamp_min(torch.finfo(back.dtype).tiny), u)
    return u


def start_vector(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str,
                 seed: int = 0) -> torch.Tensor:
    """A fixed pseudo-random start, so that two runs measure the same number."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def _float64(weight: torch.Tensor) -> torch.Tensor:
    # MPS has no float64; everything else measures in double precision.
    if weight.device.type == "mps":
        weight = weight.cpu()
    return weight.detach().to(torch.float64)


def operator_spectral_norm(layer: nn.Module, input_hw: tuple[int, int] | None = None, *,
                           iters: int = 100, tol: float = 1e-6) -> tuple[float, int]:
    """(sigma, iterations used): the l2 operator norm of a Conv2d (on inputs of size input_hw) or a
    Linear layer, by power iteration in float64 from a fixed start. A lower bound that converges to
    the norm; the iteration count says how far it got."""
    op = layer_operator(layer, input_hw)
    weight = _float64(effective_weight(layer))
    u = start_vector(op.input_shape, dtype=weight.dtype, device=weight.device)
    sigma, _, steps = power_iteration(op, weight, u, iters=iters, tol=tol)
    return sigma, steps


def conv_operator_matrix(conv: nn.Conv2d, input_hw: tuple[int, int]) -> torch.Tensor:
    """The conv layer (without bias) as an explicit float64 matrix, out_numel x in_numel, built by
    pushing every basis vector through it. Quadratic in the sizes: for tests and small layers."""
    op = ConvOperator.of(conv, input_hw)
    weight = _float64(effective_weight(conv))
    n_in = op.in_channels * op.input_hw[0] * op.input_hw[1]
    basis = torch.eye(n_in, dtype=weight.dtype, device=weight.device)
    columns = [op.apply(block.reshape(-1, *op.input_shape[1:]), weight).reshape(block.shape[0], -1)
               for block in basis.split(1024)]
    return torch.cat(columns).t().contiguous()


# -- exact l1 / linf through tap sets -------------------------------------------------------------
# Along one axis (size n, kernel k, stride s, dilation d, padding before/after), output position o
# reads input o*s - before + i*d through tap i. Tap i reaches input y when that equation has a
# solution o in [0, n_out); a set of taps is what one pixel sees along that axis.

def _axis_taps_per_input(n: int | None, k: int, s: int, d: int, before: int, after: int) -> list[torch.Tensor]:
    """The distinct sets of taps that reach one input position (column classes of the matrix).
    n None: an input large enough that every residue class modulo the stride is met in full."""
    if n is None:
        sets = [[(i * d) % s == r for i in range(k)] for r in range(s)]
    else:
        n_out = (n + before + after - d * (k - 1) - 1) // s + 1
        sets = [[(y + before - i * d) % s == 0 and 0 <= (y + before - i * d) // s < n_out
                 for i in range(k)] for y in range(n)]
    return _distinct_nonempty(sets)


def _axis_taps_per_output(n: int | None, k: int, s: int, d: int, before: int, after: int) -> list[torch.Tensor]:
    """The distinct sets of taps that land inside the input for one output position (row classes).
    n None: an input large enough that some output sees all of its taps inside."""
    if n is None:
        return [torch.ones(k, dtype=torch.bool)]
    n_out = (n + before + after - d * (k - 1) - 1) // s + 1
    return _distinct_nonempty([[0 <= o * s - before + i * d < n for i in range(k)] for o in range(n_out)])


def _distinct_nonempty(sets: list[list[bool]]) -> list[torch.Tensor]:
    return [torch.tensor(m, dtype=torch.bool) for m in dict.fromkeys(tuple(m) for m in sets) if any(m)]


def _require_zero_padding(conv: nn.Conv2d, what: str) -> None:
    if conv.padding_mode != "zeros" and any(conv._reversed_padding_repeated_twice):
        raise UserError(f"the exact {what} norm assumes zero padding; padding_mode "
                        f"'{conv.padding_mode}' is not supported",
                        "use operator_spectral_norm or conv_operator_matrix for this layer")


def _axis_args(conv: nn.Conv2d, axis: int, input_hw: tuple[int, int] | None):
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    before, after = ((top, bottom), (left, right))[axis]
    n = None if input_hw is None else int(input_hw[axis])
    return n, conv.kernel_size[axis], conv.stride[axis], conv.dilation[axis], before, after


def _class_sums(table: torch.Tensor, rows: list[torch.Tensor], cols: list[torch.Tensor]) -> torch.Tensor:
    """table: (N, kh, kw) of |K| sums. Returns (len(rows)*len(cols), N): the sum of each entry of
    table over every (row set x column set) pair."""
    mh = torch.stack(rows).to(table)  # (a, kh)
    mw = torch.stack(cols).to(table)  # (b, kw)
    return torch.einsum("nij,ai,bj->abn", table, mh, mw).reshape(-1, table.shape[0])


def _input_channel_table(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(C_in, kh, kw): sum over the output channels that read input channel c of |K[o, c', :, :]|."""
    c_out, c_per_group, kh, kw = weight.shape
    grouped = weight.abs().reshape(groups, c_out // groups, c_per_group, kh, kw).sum(1)
    return grouped.reshape(groups * c_per_group, kh, kw)


def _conv_column_taps(conv: nn.Conv2d, input_hw):
    return (_axis_taps_per_input(*_axis_args(conv, 0, input_hw)),
            _axis_taps_per_input(*_axis_args(conv, 1, input_hw)))


def _checked_weight(layer: nn.Module, input_hw: tuple[int, int] | None, which: str) -> torch.Tensor:
    """The float64 effective weight of a Linear, or of a zero-padded Conv2d that fits input_hw."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise UserError(f"layer type {type(layer).__name__} has no {which} norm here", "use nn.Conv2d or nn.Linear")
    if isinstance(layer, nn.Conv2d):
        _require_zero_padding(layer, which)
        if input_hw is not None:
            ConvOperator.of(layer, input_hw)  # validates the size
    return _float64(effective_weight(layer))


def linf_norm(layer: nn.Module, input_hw: tuple[int, int] | None = None) -> float:
    """Max absolute row sum. Linear: max_i sum_j |W_ij|. Conv2d: max_o sum_{c,i,j} |K[o,c,i,j]|,
    which is exact once some output pixel sees all its taps inside the input; with input_hw the
    taps that fall into the zero padding are left out, which is exact for any input size."""
    weight = _checked_weight(layer, input_hw, "linf")
    if isinstance(layer, nn.Linear):
        return float(weight.abs().sum(1).max())
    rows = _axis_taps_per_output(*_axis_args(layer, 0, input_hw))
    cols = _axis_taps_per_output(*_axis_args(layer, 1, input_hw))
    table = weight.abs().sum(1)  # (C_out, kh, kw): each output reads only its own group's channels
    return float(_class_sums(table, rows, cols).max())


def l1_norm(layer: nn.Module, input_hw: tuple[int, int] | None = None) -> float:
    """Max absolute column sum. Linear: max_j sum_i |W_ij|. Conv2d: over input channels c and the
    tap classes an input pixel meets (residues modulo the stride, cut by the borders), the sum of
    |K| over the output channels reading c and the taps of the class. Exact for the given input
    size; without input_hw, the value for a large input (an upper bound for small ones)."""
    weight = _checked_weight(layer, input_hw, "l1")
    if isinstance(layer, nn.Linear):
        return float(weight.abs().sum(0).max())
    rows, cols = _conv_column_taps(layer, input_hw)
    return float(_class_sums(_input_channel_table(weight, layer.groups), rows, cols).max())


def condition_number(weight: torch.Tensor) -> float:
    """sigma_max / sigma_min of the weight matrix (a conv kernel as C_out x C_in*kh*kw), in float64:
    numpy's np.linalg.cond for a full-rank matrix. inf when the matrix is numerically rank-deficient
    (sigma_min <= sigma_max * max(m, n) * eps, numpy's matrix_rank rule): for a pruned row of zeros
    LAPACK returns some 1e-14 or 1e-18 for the zero singular value, and their ratio means nothing."""
    if weight.dim() < 2:
        raise ValueError(f"condition_number needs a matrix or a conv kernel, got shape {tuple(weight.shape)}")
    matrix = _float64(weight.detach().cpu()).reshape(weight.shape[0], -1)
    values = torch.linalg.svdvals(matrix)
    if float(values.max()) == 0.0 or float(values.min()) <= rank_tolerance(values, matrix.shape):
        return float("inf")
    return float(values.max()) / float(values.min())


def rank_tolerance(values: torch.Tensor, shape: tuple[int, ...]) -> float:
    """Singular values at or below this count as zero (numpy's matrix_rank default)."""
    return float(values.max()) * max(shape) * torch.finfo(torch.float64).eps


def sparsity(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / weight.numel() if weight.numel() else 0.0
