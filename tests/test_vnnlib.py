"""VNN-LIB parsing on the shared VNN-COMP 2021 benchmarks and on hand-written properties."""

from __future__ import annotations

import csv
import functools
import re
from pathlib import Path

import pytest
import torch

from certify.common.errors import UserError
from certify.specs.vnnlib import (
    find_properties,
    parse_vnnlib,
    read_counterexample,
    write_counterexample,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "vnncomp"  # shared/ lies beside the checkout
MNISTFC = SHARED / "mnistfc"
VERIVITAL = SHARED / "verivital_mnist_conv"
TINY = SHARED / "vnncomp_test_tiny"
PROP_0 = MNISTFC / "vnnlib" / "prop_0_0.03.vnnlib"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared VNN-COMP benchmarks not present")


@functools.cache
def parsed(path: Path):
    """Each shared file is parsed once for the whole module (this machine has 2 busy cores)."""
    return parse_vnnlib(path)


def comment_label(path: Path) -> int | None:
    match = re.search(r"; Mnist property with label: (\d+)\.", path.read_text())
    return int(match.group(1)) if match else None


def write(tmp_path: Path, text: str, name: str = "p.vnnlib") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- shared benchmarks


@needs_shared
def test_every_shared_property_parses():
    files = sorted(SHARED.rglob("*.vnnlib"))
    assert len(files) == 94
    images = 0
    for path in files:
        prop = parsed(path)
        assert prop.path == path
        assert prop.lower.shape == prop.upper.shape == (prop.n_inputs,)
        assert torch.all(prop.lower <= prop.upper), path
        assert torch.isfinite(prop.lower).all() and torch.isfinite(prop.upper).all()
        label = comment_label(path)
        if label is not None:  # the 90 MNIST robustness properties
            images += 1
            assert prop.n_inputs == 784 and prop.n_outputs == 10
            assert prop.label == label, path
            assert len(prop.unsafe) == 9
            assert prop.lower.min() >= 0.0 and prop.upper.max() <= 1.0
        else:
            assert prop.label is None
    assert images == 90


@needs_shared
def test_mnistfc_prop_0_box_and_label():
    prop = parse_vnnlib(PROP_0)
    assert prop.n_inputs == 784 and prop.n_outputs == 10
    assert prop.label == 8 == comment_label(PROP_0)
    width = prop.upper - prop.lower
    clipped = (prop.lower <= 0.0) | (prop.upper >= 1.0)
    assert (~clipped).sum() > 50  # the digit's strokes
    assert torch.allclose(width[~clipped], torch.full_like(width[~clipped], 0.06), atol=1e-6)
    assert torch.all(width[clipped] <= 0.06 + 1e-6)
    assert prop.lower.min() == 0.0 and prop.upper.max() <= 1.0
    # First pixel: (<= X_0 0.029999999329447746) (>= X_0 0.0), read exactly.
    assert prop.lower[0].item() == 0.0 and prop.upper[0].item() == 0.029999999329447746
    # Every item is one row Y_8 - Y_j <= 0.
    for C, d in prop.unsafe:
        assert C.shape == (1, 10) and d.tolist() == [0.0]
        assert C[0, 8] == 1.0 and C[0].sum() == 0.0


@needs_shared
@pytest.mark.parametrize("folder", [MNISTFC, VERIVITAL])
def test_labels_and_radii_match_expected_results(folder: Path):
    with open(folder / "expected_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    for row in rows:
        prop = parsed(folder / row["vnnlib"])
        assert prop.label == int(row["label"])
        radius = ((prop.upper - prop.lower) / 2).max().item()
        assert radius == pytest.approx(float(row["max_input_radius"]), abs=1e-6)


@needs_shared
def test_tiny_properties_read_as_written():
    nano = parse_vnnlib(TINY / "test_nano.vnnlib")  # Y_0 <= -1
    assert nano.lower.tolist() == [-1.0] and nano.upper.tolist() == [1.0]
    assert len(nano.unsafe) == 1
    assert nano.unsafe[0].C.tolist() == [[1.0]] and nano.unsafe[0].d.tolist() == [-1.0]
    # Input bounds inside the single (or (and ...)) branch become the box.
    small = parse_vnnlib(TINY / "test_small.vnnlib")  # Y_0 >= 100
    assert small.lower.tolist() == [-1.0] and small.upper.tolist() == [1.0]
    assert small.unsafe[0].C.tolist() == [[-1.0]] and small.unsafe[0].d.tolist() == [-100.0]
    assert small.is_counterexample(torch.tensor([100.0])) and not small.is_counterexample(torch.tensor([99.9]))
    # ACAS Xu property 3: four ANDed asserts, one item of four rows.
    acas = parse_vnnlib(TINY / "test_prop.vnnlib")
    assert acas.n_inputs == 5 and acas.n_outputs == 5 and acas.label is None
    assert len(acas.unsafe) == 1 and acas.unsafe[0].C.shape == (4, 5)
    assert acas.lower[0].item() == -0.30353115613746867 and acas.upper[2].item() == 0.49999999998567607


@needs_shared
def test_is_counterexample_on_hand_made_outputs():
    prop = parse_vnnlib(PROP_0)  # label 8
    y = torch.zeros(10)
    y[8] = 1.0
    assert not prop.is_counterexample(y)
    y[3] = 1.5
    assert prop.is_counterexample(y)
    y[3] = 1.0  # a tie is a counterexample: the region is Y_j >= Y_8
    assert prop.is_counterexample(y)
    assert prop.is_counterexample(y.reshape(1, 10))  # any shape with 10 elements
    ys = torch.tensor([[0.0] * 8 + [2.0, 1.9], [0.0] * 8 + [2.0, 2.1], [5.0] + [0.0] * 9])
    assert prop.counterexample_mask(ys).tolist() == [False, True, True]

    acas = parse_vnnlib(TINY / "test_prop.vnnlib")  # sat iff Y_0 is minimal
    assert acas.is_counterexample(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert acas.is_counterexample(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]))
    assert not acas.is_counterexample(torch.tensor([1.0, 0.5, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError):
        acas.is_counterexample(torch.zeros(4))


# ----------------------------------------------------------------------------- finding properties


@needs_shared
def test_find_properties_in_folders_and_files(tmp_path: Path):
    pairs = find_properties(MNISTFC)
    assert len(pairs) == 30 and all(onnx is None and p.is_file() for onnx, p in pairs)
    names = [p.stem for _, p in pairs]
    assert names[:4] == ["prop_0_0.03", "prop_0_0.05", "prop_1_0.03", "prop_1_0.05"]
    assert names.index("prop_2_0.03") < names.index("prop_10_0.03")  # natural order
    assert len(find_properties(VERIVITAL)) == 60  # recursive: specs/avgpool_specs, specs/maxpool_specs
    assert find_properties(PROP_0) == [(None, PROP_0)]
    with pytest.raises(UserError, match="no .vnnlib files"):
        find_properties(tmp_path)
    with pytest.raises(UserError, match="cannot read properties"):
        find_properties(SHARED / "README.md")
    with pytest.raises(UserError, match="not found"):
        find_properties(MNISTFC / "nothing_here")


@needs_shared
def test_find_properties_in_instances_csv():
    # Row 61 names mnist-net_256x6.onnx, which the shared copy does not hold.
    with pytest.raises(UserError) as error:
        find_properties(MNISTFC / "instances.csv")
    assert f"{MNISTFC / 'instances.csv'}:61:" in str(error.value) and "256x6" in str(error.value)

    pairs = find_properties(MNISTFC / "instances.csv", skip_missing=True)
    assert len(pairs) == 60
    assert all(onnx.is_file() and prop.is_file() for onnx, prop in pairs)
    # The csv says prop_0_0.03.vnnlib; the file lies in vnnlib/ and is found by its name.
    assert pairs[0] == (MNISTFC / "mnist-net_256x2.onnx", MNISTFC / "vnnlib" / "prop_0_0.03.vnnlib")
    assert {onnx.name for onnx, _ in pairs} == {"mnist-net_256x2.onnx", "mnist-net_256x4.onnx"}
    assert pairs[30][0].name == "mnist-net_256x4.onnx" and pairs[30][1].name == "prop_0_0.03.vnnlib"

    verivital = find_properties(VERIVITAL / "instances.csv")  # "./specs/..." paths
    assert len(verivital) == 60 and all(o.is_file() and p.is_file() for o, p in verivital)
    assert verivital[0][1].samefile(VERIVITAL / "specs" / "avgpool_specs" / "prop_0_0.02.vnnlib")


def test_find_properties_in_hand_made_csv(tmp_path: Path):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "a.onnx").write_bytes(b"")
    write(tmp_path, PROPERTY_BOX, "b.vnnlib")
    instances = tmp_path / "instances.csv"
    instances.write_text("onnx,vnnlib,timeout\n\nnets/a.onnx,b.vnnlib,60\nnets/a.onnx, b.vnnlib ,60\n")
    assert find_properties(instances) == [(tmp_path / "nets" / "a.onnx", tmp_path / "b.vnnlib")] * 2
    instances.write_text("nets/a.onnx\n")
    with pytest.raises(UserError, match=r"instances.csv:1: expected 'onnx,vnnlib"):
        find_properties(instances)


# ----------------------------------------------------------------------------- hand-written properties

PROPERTY_BOX = """\
(declare-const X_0 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (<= X_0 1))
(assert (>= X_0 0))
(assert (<= Y_1 Y_0))
"""

# Every supported form, with its meaning spelled out in `holds` below.
EVERY_FORM = """\
; comment line ( with parentheses ) that must be ignored
(declare-const X_0 Real) ; trailing comment
(declare-const X_1 Real)
(declare-const X_2 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)

(assert (<= X_0 0.5))
(assert (>= X_0 -1.5e-1))
(assert (>= 2.5E+0 X_1))          ; constant on the left
(assert (<= -3 X_1))
(assert (and (<= X_2 1e-3) (>= X_2 -.5) (<= X_2 0.75)))   ; top-level and; tightest bound wins
(assert (< -2 X_0))               ; looser than 0.15: no effect

(assert (<= Y_0 Y_1))             ; output vs output, ANDed with everything below
(assert (or
    (and (>= Y_2 (+ Y_0 1.0)) (<= (* 2 Y_1) 7))
    (and (> Y_0 -1e1) (= (- Y_2 Y_1) 0.5))
))
(assert
  (<= (- Y_2)
      4))
"""


def holds(y0: float, y1: float, y2: float) -> bool:
    branch_a = y2 >= y0 + 1.0 and 2 * y1 <= 7
    branch_b = y0 >= -10 and y2 - y1 == 0.5
    return y0 <= y1 and (branch_a or branch_b) and -y2 <= 4


def test_every_grammar_form(tmp_path: Path):
    prop = parse_vnnlib(write(tmp_path, EVERY_FORM))
    assert prop.n_inputs == 3 and prop.n_outputs == 3 and prop.label is None
    assert prop.lower.tolist() == [-0.15, -3.0, -0.5]
    assert prop.upper.tolist() == [0.5, 2.5, 1e-3]
    assert prop.lower.dtype == torch.float64
    assert len(prop.unsafe) == 2
    # branch a: Y_0 - Y_1 <= 0, Y_0 - Y_2 <= -1, 2 Y_1 <= 7, -Y_2 <= 4 (row order follows the file)
    C, d = prop.unsafe[0]
    assert C.tolist() == [[1, -1, 0], [0, 0, -1], [1, 0, -1], [0, 2, 0]]
    assert d.tolist() == [0, 4, -1, 7]

    generator = torch.Generator().manual_seed(0)
    ys = torch.randint(-12, 12, (4000, 3), generator=generator).double() / 2  # exact halves: ties happen
    expected = [holds(*y) for y in ys.tolist()]
    assert 100 < sum(expected) < 3900  # both outcomes are well exercised
    assert prop.counterexample_mask(ys).tolist() == expected
    assert [prop.is_counterexample(y) for y in ys[:50]] == expected[:50]


def test_label_detection_needs_all_other_classes(tmp_path: Path):
    header = "(declare-const X_0 Real)\n" + "".join(f"(declare-const Y_{j} Real)\n" for j in range(3))
    box = "(assert (<= X_0 1))\n(assert (>= X_0 0))\n"
    every = header + box + "(assert (or (and (>= Y_0 Y_1)) (and (<= (* 3 Y_1) (* 3 Y_2)))))\n"
    assert parse_vnnlib(write(tmp_path, every)).label == 1
    subset = header + box + "(assert (or (and (>= Y_0 Y_1)) (and (>= Y_0 Y_1))))\n"
    assert parse_vnnlib(write(tmp_path, subset)).label is None
    single = header + box + "(assert (>= Y_0 Y_1))\n"  # 3 outputs, one rival: not a robustness spec
    assert parse_vnnlib(write(tmp_path, single)).label is None
    two_classes = PROPERTY_BOX  # Y_1 <= Y_0: label 1 against the only other class
    assert parse_vnnlib(write(tmp_path, two_classes)).label == 1


MALFORMED = {
    "unclosed paren": (
        "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1)\n(assert (>= X_0 0))\n",
        3, "never closed"),
    "extra paren": ("(declare-const X_0 Real))\n", 1, "unexpected ')'"),
    "unknown operator": (
        PROPERTY_BOX + "(assert (or (and (=> Y_0 Y_1)) (and (<= Y_0 0))))\n", 7, "unknown operator '=>'"),
    "unknown term operator": (PROPERTY_BOX + "(assert (<= (max Y_0 Y_1) 0))\n", 7, "unknown operator 'max'"),
    "not": (PROPERTY_BOX + "(assert (not (<= Y_0 0)))\n", 7, "unknown operator 'not'"),
    "missing lower bound": (
        "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
        "(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= X_1 1))\n(assert (<= Y_0 0))\n",
        2, "X_1 (declared here) has no lower bound"),
    "missing upper bound": (
        "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 0))\n(assert (<= Y_0 0))\n",
        1, "X_0 (declared here) has no upper bound"),
    "bad number": (PROPERTY_BOX.replace("(<= X_0 1)", "(<= X_0 0.5.1)"), 4, "bad number '0.5.1'"),
    "bad exponent": (PROPERTY_BOX.replace("(>= X_0 0)", "(>= X_0\n 1e)"), 6, "bad number '1e'"),
    "undeclared": (PROPERTY_BOX + "(assert (<= Y_2 0))\n", 7, "Y_2 is used but not declared"),
    "unknown name": (PROPERTY_BOX + "(assert (<= Y_0 foo))\n", 7, "unknown name 'foo'"),
    "linear input constraint": (
        PROPERTY_BOX.replace("(declare-const Y_0", "(declare-const X_1 Real)\n(declare-const Y_0")
        + "(assert (<= (+ X_0 X_1) 1))\n", 8, "only boxes are supported"),
    "mixed constraint": (PROPERTY_BOX + "(assert (<= X_0 Y_0))\n", 7, "mixes inputs and outputs"),
    "two boxes": (
        "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
        "(assert (or (and (>= X_0 0) (<= X_0 1) (<= Y_0 0))\n(and (>= X_0 2) (<= X_0 3) (<= Y_0 0))))\n",
        3, "only one input box is supported"),
    "empty box": (PROPERTY_BOX + "(assert (>= X_0 2))\n", 7, "empty input box"),
    "product of variables": (PROPERTY_BOX + "(assert (<= (* Y_0 Y_1) 0))\n", 7, "product of two variables"),
    "gap in declarations": ("(declare-const X_0 Real)\n(declare-const Y_1 Real)\n", 2, "Y_0 is not"),
    "bad sort": ("(declare-const X_0 Int)\n", 1, "sort 'Int'"),
    "no outputs constrained": ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n"
                               "(assert (>= X_0 0))\n", 1, "no constraint on the outputs"),
    "atom at top level": (PROPERTY_BOX + "assert\n", 7, "expected a command"),
    "comparison with one term": (PROPERTY_BOX + "(assert (<= Y_0))\n", 7, "needs two terms"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_property_names_file_and_line(tmp_path: Path, case: str):
    text, line, expected = MALFORMED[case]
    path = write(tmp_path, text)
    with pytest.raises(UserError) as error:
        parse_vnnlib(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert expected in message
    assert error.value.hint  # every error says what to do


def test_missing_file_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        parse_vnnlib(tmp_path / "absent.vnnlib")


# ----------------------------------------------------------------------------- counterexamples


def test_write_counterexample_round_trip(tmp_path: Path):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 28, 28, generator=generator)  # float32, flattened row-major
    y = torch.randn(10, generator=generator) * 1e3
    path = tmp_path / "results" / "out.txt"
    write_counterexample(path, x, y)
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "sat"
    assert lines[1] == f"((X_0 {x.flatten()[0].item()!r})"
    assert lines[2].startswith(" (X_1 ") and lines[785].startswith(" (Y_0 ")
    assert lines[-1] == f" (Y_9 {y[9].item()!r}))"
    assert len(lines) == 1 + 784 + 10
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]  # no temporary left behind

    x_read, y_read = read_counterexample(path)
    assert torch.equal(x_read, x.flatten().double()) and torch.equal(y_read, y.double())
    # The bare s-expression (as in VNN-COMP .counterexample files) reads too.
    bare = write(tmp_path, text.split("\n", 1)[1], "bare.counterexample")
    assert torch.equal(read_counterexample(bare)[1], y.double())

    broken = write(tmp_path, "sat\n((X_0 1.0)\n (X_2 2.0))\n", "broken.txt")
    with pytest.raises(UserError, match=r"broken.txt:3: X_2 out of order"):
        read_counterexample(broken)


@needs_shared
def test_counterexample_checks_against_property(tmp_path: Path):
    prop = parse_vnnlib(PROP_0)
    x = (prop.lower + prop.upper) / 2
    y = torch.zeros(10, dtype=torch.float64)
    y[2] = 3.0  # class 2 beats label 8
    write_counterexample(tmp_path / "cex.txt", x, y)
    x_read, y_read = read_counterexample(tmp_path / "cex.txt")
    assert x_read.shape == (prop.n_inputs,) and y_read.shape == (prop.n_outputs,)
    assert torch.all((prop.lower <= x_read) & (x_read <= prop.upper))
    assert prop.is_counterexample(y_read)
