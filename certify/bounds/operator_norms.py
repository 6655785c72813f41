"""Provable UPPER bounds on the operator norms of Conv2d / Linear layers, for Lipschitz certificates.

Power iteration approaches the l2 norm from below, so it cannot certify anything. Here:
  - "exact SVD": the largest singular value of the layer's explicit matrix (float64), where that
    matrix fits in memory (EXPLICIT_LIMIT entries), as the square root of the top eigenvalue of its
    smaller Gram matrix (the same number, several times faster than a full SVD);
  - "Gram iteration" (Delattre et al., ICML 2023) otherwise: sigma_1(G) <= ||G_t||_F ** (1 / 2**t)
    for the Gram powers G_{t+1} = G_t^H G_t, a bound for every t that falls to sigma_1 quickly.
    For a convolution it runs on the kernel's 2-D FFT: a zero-padded, stride-1 convolution is a
    crop of the circular convolution on the padded input (no output it keeps wraps around), the
    zero padding is an isometry into that input and the crop a coordinate projection, so its norm
    is at most the circular one's, which is the largest sigma_1 over the per-frequency
    C_out x C_in matrices. A stride is undone by the polyphase form (see conv_fft_gram).
The l-infinity operator norm (the largest absolute row sum) is exact and cheap in every case: for
a convolution the row sums are the convolution of an all-ones image with |kernel|.

Every l2 value is raised by ROUNDING (relative) to cover the float64 rounding of its computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

EXPLICIT_LIMIT = 1_000_000  # matrix entries (8 MB in float64) up to which the exact SVD is used
GRAM_STEPS = 14  # bound / sigma_1 <= rank ** (1 / 2**(GRAM_STEPS+1)): 1.0002 for rank 1000
# Steps on one large dense matrix, each a product of two n x n matrices: at most 1.02 x sigma_1 for rank 4096.
DENSE_GRAM_STEPS = 8
ROUNDING = 1e-6
_FREQUENCY_CHUNK = 4096  # per-frequency matrices handled at once (memory)

EXACT_SVD = "exact SVD of the explicit matrix"
GRAM_MATRIX = "Gram iteration on the weight matrix"
GRAM_FFT = "Gram iteration on the kernel's FFT (circular convolution bounds the zero-padded one)"


@dataclass(frozen=True)
class Norm:
    """An upper bound on one operator norm, and how it was obtained."""

    value: float
    method: str


def _raised(value: float) -> float:
    return value * (1.0 + ROUNDING)


def gram_iteration(matrices: torch.Tensor, steps: int = GRAM_STEPS) -> torch.Tensor:
    """Upper bounds (batch,) on sigma_1 of each matrix of a (batch, m, n) stack (real or complex).

    Each step rescales to unit Frobenius norm (the scale is kept as a logarithm) so that the
    powers neither overflow nor underflow as a whole.
    """
    gram = matrices.to(torch.complex128 if matrices.is_complex() else torch.float64)
    if gram.shape[-2] < gram.shape[-1]:
        gram = gram.mT.conj()  # same singular values, smaller Gram matrices
    log_scale = torch.zeros(gram.shape[0], dtype=torch.float64, device=gram.device)
    for _ in range(steps):
        frobenius = torch.linalg.matrix_norm(gram).clamp_min(torch.finfo(torch.float64).tiny)
        log_scale = 2.0 * (log_scale + frobenius.log())
        gram = gram / frobenius[:, None, None].to(gram.dtype)
        gram = gram.mH @ gram
    final = torch.linalg.matrix_norm(gram).clamp_min(torch.finfo(torch.float64).tiny)
    bound = torch.exp((final.log() + log_scale) / 2.0 ** steps)
    zero = matrices.flatten(1).abs().amax(1) == 0
    return torch.where(zero, torch.zeros_like(bound), bound)


def _top_singular_value(matrix: torch.Tensor) -> float:
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt()) if gram.numel() else 0.0


def matrix_l2(matrix: torch.Tensor) -> Norm:
    """The l2 operator norm of an explicit matrix: exact SVD where it fits, Gram iteration otherwise."""
    matrix = matrix.detach().to(torch.float64)
    if matrix.numel() <= EXPLICIT_LIMIT:
        return Norm(_raised(_top_singular_value(matrix)), EXACT_SVD)
    return Norm(_raised(float(gram_iteration(matrix[None], DENSE_GRAM_STEPS)[0])), GRAM_MATRIX)


def linear_norms(weight: torch.Tensor) -> tuple[Norm, float]:
    """(l2 bound, exact l-infinity norm) of x -> W x."""
    weight = weight.detach().to(torch.float64)
    return matrix_l2(weight), float(weight.abs().sum(1).max()) if weight.numel() else 0.0


def _weight64(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().to(torch.float64)


def conv_matrix(conv: nn.Conv2d, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """The conv (without bias) on inputs of `input_shape` (C, H, W) as an explicit float64 matrix."""
    weight = _weight64(conv)
    n_in = math.prod(input_shape)
    columns = []
    for start in range(0, n_in, 1024):
        stop = min(start + 1024, n_in)
        basis = torch.zeros(stop - start, n_in, dtype=torch.float64, device=weight.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        columns.append(conv._conv_forward(basis.view(-1, *input_shape), weight, None).flatten(1))
    return torch.cat(columns).T


def _conv_output_numel(conv: nn.Conv2d, input_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        probe = torch.zeros(1, *input_shape, dtype=torch.float64, device=conv.weight.device)
        return conv._conv_forward(probe, _weight64(conv), None).numel()


def _dense_kernel(conv: nn.Conv2d) -> torch.Tensor:
    """The kernel as (C_out, C_in, kh', kw'): groups as zero blocks, dilation as zero taps."""
    weight = _weight64(conv)
    c_out, per_group, kh, kw = weight.shape
    dh, dw = conv.dilation
    dense = torch.zeros(c_out, conv.in_channels, dh * (kh - 1) + 1, dw * (kw - 1) + 1,
                        dtype=torch.float64, device=weight.device)
    outs_per_group = c_out // conv.groups
    for group in range(conv.groups):
        rows = slice(group * outs_per_group, (group + 1) * outs_per_group)
        cols = slice(group * per_group, (group + 1) * per_group)
        dense[rows, cols, ::dh, ::dw] = weight[rows]
    return dense


def _polyphase(kernel: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """(C_out, C_in, kh, kw) -> (C_out, C_in*sh*sw, ceil(kh/sh), ceil(kw/sw)): a stride-s correlation
    is the stride-1 correlation of this kernel with the s*s phases of the input as channels."""
    sh, sw = stride
    c_out, c_in, kh, kw = kernel.shape
    ah, aw = -(-kh // sh), -(-kw // sw)
    padded = torch.zeros(c_out, c_in, ah * sh, aw * sw, dtype=kernel.dtype, device=kernel.device)
    padded[:, :, :kh, :kw] = kernel
    phases = padded.view(c_out, c_in, ah, sh, aw, sw).permute(0, 1, 3, 5, 2, 4)
    return phases.reshape(c_out, c_in * sh * sw, ah, aw)


def conv_fft_gram(conv: nn.Conv2d, input_shape: tuple[int, int, int]) -> float:
    """An upper bound on the l2 norm of a zero-padded conv: Gram iteration on each frequency's
    matrix of the circular convolution on the padded input size.

    A stride s is undone first: output o reads padded pixel o*s + a*s + r through tap a*s + r, so
    the conv is the stride-1 one of the polyphase kernel on the input's s*s phases (a permutation
    of the zero-padded input, itself padded to a multiple of s), and no kept output wraps around.
    """
    left, right, top, bottom = (int(p) for p in conv._reversed_padding_repeated_twice)
    if conv.padding_mode != "zeros" and any((left, right, top, bottom)):
        raise ValueError(f"padding_mode {conv.padding_mode!r} is not a zero padding")
    stride = tuple(int(s) for s in conv.stride)
    size = tuple(-(-(n + before + after) // s) for n, before, after, s in
                 zip(input_shape[1:], (top, left), (bottom, right), stride))
    spectrum = torch.fft.fft2(_polyphase(_dense_kernel(conv), stride), s=size)  # (C_out, C_in s s, H', W')
    per_frequency = spectrum.permute(2, 3, 0, 1).reshape(-1, *spectrum.shape[:2])
    return max(float(gram_iteration(chunk).max()) for chunk in per_frequency.split(_FREQUENCY_CHUNK))


def conv_norms(conv: nn.Conv2d, input_shape: tuple[int, int, int]) -> tuple[Norm, float]:
    """(l2 bound, l-infinity bound) of the conv (without bias) on inputs of `input_shape` (C, H, W).

    The l-infinity value is exact for zero padding; other padding modes repeat border pixels, so
    the taps' absolute sums bound the matrix's row sums from above.
    """
    input_shape = tuple(int(d) for d in input_shape)
    with torch.no_grad():
        ones = torch.ones(1, *input_shape, dtype=torch.float64, device=conv.weight.device)
        linf = float(conv._conv_forward(ones, _weight64(conv).abs(), None).max())
        if math.prod(input_shape) * _conv_output_numel(conv, input_shape) <= EXPLICIT_LIMIT:
            return matrix_l2(conv_matrix(conv, input_shape)), linf
        return Norm(_raised(conv_fft_gram(conv, input_shape)), GRAM_FFT), linf
