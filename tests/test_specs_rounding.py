"""Boxes are rounded OUTWARD into the model's dtype: the box that is bounded contains the claimed one."""

from __future__ import annotations

from fractions import Fraction

import torch

from certify.specs.input_spec import InputSpec
from certify.specs.rounding import eps_ball, inward_box, outward_box
from certify.specs.vnnlib import parse_vnnlib


def _exact(t: torch.Tensor) -> list[Fraction]:
    return [Fraction(v) for v in t.to(torch.float64).flatten().tolist()]


def _points(n: int = 400) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 0.8 + 0.1


def test_input_spec_box_contains_the_real_eps_ball():
    x = _points()
    for eps in (2 / 255, 0.1, 1e-3, 0.3):
        lower, upper = InputSpec().box(x, eps)
        assert lower.dtype == upper.dtype == torch.float32
        e = Fraction(eps)
        for xi, lo, hi in zip(_exact(x), _exact(lower), _exact(upper)):
            assert lo <= max(xi - e, Fraction(0)), (xi, eps)
            assert hi >= min(xi + e, Fraction(1)), (xi, eps)


def test_input_spec_box_is_at_most_one_ulp_wider_and_exact_when_representable():
    x = _points()
    lower, upper = InputSpec().box(x, 2 / 255)
    nearest_lo, nearest_hi = (x.double() - 2 / 255).float(), (x.double() + 2 / 255).float()
    assert torch.all(lower >= torch.nextafter(nearest_lo, torch.tensor(-1.0)))
    assert torch.all(upper <= torch.nextafter(nearest_hi, torch.tensor(2.0)))
    lo, hi = InputSpec().box(torch.tensor([0.5, 0.125]), 0.25)
    assert lo.tolist() == [0.25, 0.0] and hi.tolist() == [0.75, 0.375]


def test_input_spec_box_keeps_float64_and_the_clip():
    x = torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64)
    lower, upper = InputSpec().box(x, 0.1)
    assert lower.dtype == torch.float64
    assert lower[0] == 0.0 and upper[1] == 1.0
    assert Fraction(lower[2].item()) <= Fraction(0.3) - Fraction(0.1) <= Fraction(upper[2].item())
    assert float(upper[2]) <= 0.4 + 1e-15


def test_eps_ball_corrects_a_float64_result_that_rounded_inward():
    # In float64, fl(x - eps) rounds to nearest and so lands inside the real ball for some x;
    # with a float64 model there is no later float32 cast to hide that.
    x = torch.rand(400, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.6 + 0.2
    eps = 0.1
    lower, upper = eps_ball(x, eps, 0.0, 1.0)
    nearest_lo = x - eps
    assert any(Fraction(n) > xi - Fraction(eps) for n, xi in zip(nearest_lo.tolist(), _exact(x)))
    for box in ((lower, upper), InputSpec().box(x, eps)):
        for xi, lo, hi in zip(_exact(x), _exact(box[0]), _exact(box[1])):
            assert lo <= xi - Fraction(eps) and hi >= xi + Fraction(eps)


def test_outward_and_inward_box_bracket_a_float64_box():
    lower = torch.tensor([0.1, -0.3, 0.5, 1 / 3], dtype=torch.float64)
    upper = lower + torch.tensor([0.2, 1e-9, 0.0, 1e-12], dtype=torch.float64)
    out_lo, out_hi = outward_box(lower, upper, torch.float32)
    in_lo, in_hi = inward_box(lower, upper, torch.float32)
    assert torch.all(out_lo.double() <= lower) and torch.all(out_hi.double() >= upper)
    # Exact values stay exact; inexact ones are one float32 ulp from the nearest rounding at most.
    assert out_lo[2] == 0.5 and out_hi[2] == 0.5 and in_lo[2] == 0.5
    assert torch.all(in_lo.double() >= lower)
    wide = in_hi >= in_lo
    assert torch.all(wide)
    assert torch.all((in_hi.double() <= upper) | (in_hi == in_lo))


def test_outward_box_is_the_smallest_and_inward_box_the_largest_float32_box():
    g = torch.Generator().manual_seed(1)
    lower = torch.rand(1000, generator=g, dtype=torch.float64) * 4 - 2
    upper = lower + torch.rand(1000, generator=g, dtype=torch.float64) * 1e-6
    up, down = torch.tensor(float("inf")), torch.tensor(-float("inf"))
    lo, hi = outward_box(lower, upper)
    assert lo.dtype == hi.dtype == torch.float32
    assert torch.all(lo.double() <= lower) and torch.all(torch.nextafter(lo, up).double() > lower)
    assert torch.all(hi.double() >= upper) and torch.all(torch.nextafter(hi, down).double() < upper)
    lo, hi = inward_box(lower, upper)
    assert torch.all(lo.double() >= lower) and torch.all(torch.nextafter(lo, down).double() < lower)
    fits = hi.double() <= upper
    assert torch.all(fits | (hi == lo))  # an axis with no float32 inside collapses to its lower end
    assert torch.all(~fits | (torch.nextafter(hi, up).double() > upper))


def test_vnnlib_box_and_spec_matrix_keep_the_written_precision(tmp_path):
    path = tmp_path / "p.vnnlib"
    path.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
                    "(assert (>= X_0 0.1))\n(assert (<= X_0 0.30000000000000004))\n"
                    "(assert (<= (* 0.1 Y_0) (* 0.30000000000000004 Y_1)))\n")
    prop = parse_vnnlib(path)
    assert prop.lower.dtype == prop.upper.dtype == torch.float64
    assert prop.lower.item() == 0.1 and prop.upper.item() == 0.30000000000000004
    (C, d), = prop.unsafe
    assert C.dtype == d.dtype == torch.float64
    # float32 would change both coefficients; the spec keeps the float64 the file was read to.
    assert C[0].tolist() == [0.1, -0.30000000000000004] and d.tolist() == [0.0]
    lo, hi = outward_box(prop.lower, prop.upper)
    assert lo.double() <= prop.lower and hi.double() >= prop.upper
