"""ONNX import: third-party VNN-COMP graphs and our own exports become plain torch modules that
match onnxruntime and that auto_LiRPA can bound soundly."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from certify.bounds.compat import lirpa
from certify.common.errors import UserError
from certify.onnx_import.parity import check_against_onnxruntime
from certify.onnx_import.reader import SUPPORTED_OPS, import_onnx

VNNCOMP = Path(__file__).resolve().parents[2] / "shared" / "vnncomp"  # shared/ lies beside the checkout
# A checkout without shared/ beside it runs the tests on our own models only.
THIRD_PARTY = {name: path for name, path in {
    "mnist-256x2": VNNCOMP / "mnistfc/mnist-net_256x2.onnx",
    "mnist-256x4": VNNCOMP / "mnistfc/mnist-net_256x4.onnx",
    "convnet-avgpool": VNNCOMP / "verivital_mnist_conv/Convnet_avgpool.onnx",
    "convnet-maxpool": VNNCOMP / "verivital_mnist_conv/Convnet_maxpool.onnx",
    **{f"tiny-{p.stem}": p for p in sorted((VNNCOMP / "vnncomp_test_tiny").glob("*.onnx"))},
}.items() if path.is_file()}
# An image-like point per third-party classifier, so that its ReLUs are not all off: the centre
# of a property box from the benchmark.
SPEC_OF = {
    "mnist-256x2": VNNCOMP / "mnistfc/vnnlib/prop_0_0.03.vnnlib",
    "mnist-256x4": VNNCOMP / "mnistfc/vnnlib/prop_0_0.03.vnnlib",
    "convnet-avgpool": VNNCOMP / "verivital_mnist_conv/specs/avgpool_specs/prop_0_0.02.vnnlib",
    "convnet-maxpool": VNNCOMP / "verivital_mnist_conv/specs/maxpool_specs/prop_0_0.004.vnnlib",
}
OWN = ["small-cnn", "mlp", "residual-cnn", "batchnorm-cnn", "normalized-cnn"]
CLASSIFIERS = [name for name in THIRD_PARTY if not name.startswith("tiny-")] + OWN
EXPORT_BATCH = 2
needs_shared = pytest.mark.skipif(len(THIRD_PARTY) < 4, reason="shared VNN-COMP models not present beside the checkout")


# ---------------------------------------------------------------------------------------------
# Our own models, exported with the legacy (TorchScript) exporter as `harden export` does


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.conv2(torch.relu(self.conv1(h))))
        return self.head(torch.flatten(h, 1))


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, 1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(1568, 100), nn.ReLU(), nn.Linear(100, 10))


def make_torch_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "small-cnn":
        return small_cnn()
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                             nn.Linear(32, 10))
    if name == "residual-cnn":
        return Residual()
    if name == "batchnorm-cnn":
        # BatchNorm after a ReLU: the exporter cannot fold it into the conv, so it stays in the graph.
        norm = nn.BatchNorm2d(8)
        with torch.no_grad():
            norm.running_mean.uniform_(0.0, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
        return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), norm, nn.Flatten(),
                             nn.Linear(8 * 14 * 14, 10))
    if name == "normalized-cnn":
        return nn.Sequential(Normalize(0.1307, 0.3081), small_cnn())
    raise KeyError(name)


def export(model: nn.Module, path: Path) -> Path:
    model.eval()
    torch.onnx.export(model, torch.rand(EXPORT_BATCH, 1, 28, 28), str(path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx_models")
    paths = dict(THIRD_PARTY)
    for name in OWN:
        paths[name] = export(make_torch_model(name), folder / f"{name}.onnx")
    return paths


@pytest.fixture(scope="module")
def imported(model_paths):
    return {name: import_onnx(path) for name, path in model_paths.items()}


def onnxruntime_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    """Reference outputs (N, classes), feeding the graph one sample at a time where its batch is
    fixed (or absent)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0]
    if len(declared.shape) == x.dim() - 1:
        feeds = [sample.numpy() for sample in x]
    elif isinstance(declared.shape[0], int):
        feeds = [sample[None].numpy() for sample in x]
    else:
        feeds = [x.numpy()]
    outs = [session.run(None, {declared.name: feed})[0] for feed in feeds]
    return np.concatenate(outs).reshape(len(x), -1)


def box_centre(spec: Path, shape: tuple[int, ...]) -> torch.Tensor:
    bounds: dict[int, list[float]] = {}
    for index, value in re.findall(r"\(assert \([<>]= X_(\d+) ([-+.eE\d]+)\)\)", spec.read_text()):
        bounds.setdefault(int(index), []).append(float(value))
    centre = [sum(bounds[i]) / 2 for i in range(len(bounds))]
    return torch.tensor(centre, dtype=torch.float32).reshape(1, *shape)


# ---------------------------------------------------------------------------------------------
# Parity with onnxruntime


@pytest.mark.parametrize("name", list(THIRD_PARTY) + OWN)
def test_matches_onnxruntime_on_a_new_batch_size(name, model_paths, imported):
    model = imported[name]
    x = torch.rand((16, *model.input_shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = model.module(x)
    reference = onnxruntime_outputs(model_paths[name], x)
    assert ours.dtype == torch.float32 and ours.dim() == 2 and ours.shape[0] == 16
    assert ours.shape == reference.shape
    assert np.abs(ours.numpy() - reference).max() <= 1e-4 + 1e-4 * np.abs(reference).max()
    assert check_against_onnxruntime(model_paths[name], model.module, x) <= 1e-3
    assert not model.module.training


@needs_shared
def test_shapes_and_metadata_of_imported_models(imported, model_paths, tmp_path):
    assert imported["mnist-256x2"].input_shape == (784, 1)
    assert imported["mnist-256x2"].onnx_input_shape == (1, 784, 1)
    assert imported["mnist-256x2"].opset == 9
    assert imported["tiny-test_sat"].input_shape == (1, 1, 5)
    assert imported["tiny-test_small"].input_shape == (1,)  # a graph without batch axis
    assert imported["small-cnn"].input_shape == (1, 28, 28)
    assert imported["small-cnn"].onnx_input_shape == ("batch", 1, 28, 28)
    assert imported["small-cnn"].opset == 17
    assert imported["small-cnn"].metadata == {}

    model = onnx.load(str(model_paths["small-cnn"]))
    helper.set_model_props(model, {"harden.dataset": "mnist", "harden.classes": "0,1,2,3,4,5,6,7,8,9"})
    onnx.save(model, str(tmp_path / "with_metadata.onnx"))
    with_metadata = import_onnx(tmp_path / "with_metadata.onnx")
    assert with_metadata.metadata == {"harden.dataset": "mnist", "harden.classes": "0,1,2,3,4,5,6,7,8,9"}


@needs_shared
def test_weights_land_in_ordinary_layers(imported):
    """harden's layer rewrites look for nn.Conv2d / nn.Linear: the imported CNN has exactly the
    original layers, with the original weights."""
    original = make_torch_model("small-cnn")
    module = imported["small-cnn"].module
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert [(c.stride, c.padding) for c in convs] == [((2, 2), (1, 1))] * 2
    assert torch.equal(convs[1].weight, original[2].weight)
    assert torch.equal(linears[0].weight, original[5].weight)
    assert torch.equal(linears[1].bias, original[7].bias)
    # BatchNorm and the input normalisation keep their own pieces
    assert any(isinstance(m, nn.BatchNorm2d) for m in imported["batchnorm-cnn"].module.modules())
    # MatMul + Add of a bias (ACAS Xu nets) become one nn.Linear with that bias
    tiny = imported["tiny-test_sat"].module
    assert sum(isinstance(m, nn.Linear) and m.bias is not None for m in tiny.modules()) == 7


def test_check_against_onnxruntime_catches_a_wrong_module(imported, model_paths):
    path = model_paths["small-cnn"]
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    wrong = copy.deepcopy(imported["small-cnn"].module)
    last = [m for m in wrong.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias[3] += 1e-3
    with pytest.raises(UserError, match="differs from onnxruntime"):
        check_against_onnxruntime(path, wrong, x)
    # With a tolerance above the change it passes and reports the real difference.
    diff = check_against_onnxruntime(path, wrong, x, atol=1e-2)
    assert 0.9e-3 <= diff <= 1.1e-3
    # Transposed or mis-shaped outputs are caught too.
    with pytest.raises(UserError):
        check_against_onnxruntime(path, nn.Sequential(imported["small-cnn"].module, nn.Linear(10, 9)), x)


@needs_shared
def test_noop_pad_is_removed(imported):
    graph = onnx.load(str(THIRD_PARTY["convnet-avgpool"])).graph
    assert "Pad" in [node.op_type for node in graph.node]
    module = imported["convnet-avgpool"].module
    called = [node.target for node in module.graph.nodes if node.op in ("call_function", "call_module")]
    assert torch.nn.functional.pad not in called
    assert [type(module.get_submodule(t)).__name__ for t in called if isinstance(t, str)] == [
        "Conv2d", "ReLU", "AvgPool2d", "Linear"]


# ---------------------------------------------------------------------------------------------
# auto_LiRPA on the imported classifiers


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_lirpa_bounds_are_sound(name, imported):
    auto_lirpa = lirpa()
    model = imported[name]
    if name in SPEC_OF:
        x0 = box_centre(SPEC_OF[name], model.input_shape)
    else:
        x0 = torch.rand((1, *model.input_shape), generator=torch.Generator().manual_seed(5))
    eps = 0.01
    bounded = auto_lirpa.BoundedModule(model.module, torch.zeros_like(x0), device="cpu")
    assert not any(type(node).__name__ == "BoundPad" for node in bounded.modules())
    points = x0 + eps * (2 * torch.rand((500, *model.input_shape),
                                        generator=torch.Generator().manual_seed(6)) - 1)
    with torch.no_grad():
        outputs = model.module(points)
    assert (outputs.max(0).values - outputs.min(0).values).max() > 1e-4  # a box that moves the logits
    widths = {}
    for method in ("IBP", "backward"):
        box = auto_lirpa.BoundedTensor(x0, auto_lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps))
        lower, upper = bounded.compute_bounds(x=(box,), method=method)
        assert lower.shape == upper.shape == (1, outputs.shape[1])
        assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
        slack = 1e-5 + 1e-5 * outputs.abs()
        assert (outputs >= lower - slack).all(), method
        assert (outputs <= upper + slack).all(), method
        widths[method] = (upper - lower).sum().item()
    assert widths["backward"] <= widths["IBP"] * 1.0001  # CROWN is no looser on these ReLU nets


# ---------------------------------------------------------------------------------------------
# Hand-built graphs: the less common forms of the supported ops, and the refusals


def make_graph(nodes, inputs, outputs, initializers, opset=17, path=None):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), name=k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def float_input(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_operator_zoo_matches_onnxruntime(tmp_path):
    """Fixed batch 1, asymmetric and SAME pads, a real Pad, BatchNorm, pools, Transpose, Concat,
    Squeeze/Unsqueeze, Gemm with alpha/beta/transB=0, MatMul + bias, and a [1,10,1,1] output."""
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32) * 0.5  # noqa: E731
    init = {
        "w1": f32(4, 3, 3, 3), "b1": f32(4), "w2": f32(4, 4, 2, 2),
        "scale": f32(4) + 1, "shift": f32(4), "mean": f32(4), "var": np.abs(f32(4)) + 0.5,
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "fill": np.array(0.5, np.float32),
        "flat": np.array([1, -1], np.int64), "ax2": np.array([2], np.int64),
        "wm": f32(72, 10), "bm": f32(10), "mul": f32(1, 10), "two": np.array(2.0, np.float32),
        "wg": f32(4, 10), "cg": f32(10), "out_shape": np.array([1, 10, 1, 1], np.int64),
    }
    N = helper.make_node
    nodes = [
        N("Conv", ["x", "w1", "b1"], ["c1"], pads=[0, 0, 1, 1], name="conv_asym"),     # (1,4,7,7)
        N("LeakyRelu", ["c1"], ["a1"], alpha=0.2),
        N("Conv", ["a1", "w2"], ["c2"], strides=[2, 2], auto_pad="SAME_UPPER"),      # (1,4,4,4)
        N("Sigmoid", ["c2"], ["s2"]),
        N("BatchNormalization", ["s2", "scale", "shift", "mean", "var"], ["bn"], epsilon=1e-3),
        N("Pad", ["bn", "pads", "fill"], ["p"], mode="constant"),                      # (1,4,6,6)
        N("AveragePool", ["p"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),      # (1,4,6,6)
        N("MaxPool", ["ap"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),            # (1,4,3,3)
        N("Transpose", ["mp"], ["t"], perm=[0, 2, 3, 1]),                             # (1,3,3,4)
        N("Reshape", ["t", "flat"], ["r"]),                                           # (1,36)
        N("Unsqueeze", ["r", "ax2"], ["u"]),                                          # (1,36,1)
        N("Tanh", ["u"], ["th"]),
        N("Concat", ["u", "th"], ["cat"], axis=1),                                    # (1,72,1)
        N("Squeeze", ["cat", "ax2"], ["sq"]),                                         # (1,72)
        N("Dropout", ["sq"], ["d"]),
        N("MatMul", ["d", "wm"], ["mm"]),
        N("Add", ["mm", "bm"], ["lin"]),
        N("Mul", ["lin", "mul"], ["m"]),
        N("Div", ["m", "two"], ["dv"]),
        N("Constant", [], ["k"], value=numpy_helper.from_array(np.full((10,), 0.25, np.float32))),
        N("Sub", ["k", "dv"], ["main"]),
        N("GlobalAveragePool", ["bn"], ["gap"]),                                      # (1,4,1,1)
        N("Flatten", ["gap"], ["gf"], axis=-3),                                       # (1,4)
        N("Gemm", ["gf", "wg", "cg"], ["side"], alpha=0.5, beta=2.0),
        N("Add", ["main", "side"], ["sum"]),
        N("Identity", ["sum"], ["sum2"]),
        N("Relu", ["sum2"], ["rl"]),
        N("Reshape", ["rl", "out_shape"], ["y"]),
    ]
    path = make_graph(nodes, [float_input("x", [1, 3, 8, 8])], [float_input("y", [1, 10, 1, 1])],
                      init, path=tmp_path / "zoo.onnx")
    model = import_onnx(path)
    assert model.input_shape == (3, 8, 8)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.module(x)
    reference = onnxruntime_outputs(path, x)
    assert ours.shape == (16, 10)
    assert np.abs(ours.numpy() - reference).max() <= 1e-4
    assert np.ptp(reference, axis=0).max() > 1e-2  # the outputs do depend on the input
    assert sum(isinstance(m, nn.Linear) for m in model.module.modules()) == 2  # MatMul+Add fused


def test_softmax_output_is_refused(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["z"], transB=1),
             helper.make_node("Softmax", ["z"], ["p"], axis=1, name="probs")]
    path = make_graph(nodes, [float_input("x", [1, 4])], [float_input("p", [1, 3])],
                      {"w": np.ones((3, 4), np.float32)}, path=tmp_path / "softmax.onnx")
    with pytest.raises(UserError, match="Softmax") as error:
        import_onnx(path)
    assert "logits" in error.value.hint


def test_unsupported_op_is_named(tmp_path):
    nodes = [helper.make_node("Softsign", ["x"], ["y"], name="my_softsign")]
    path = make_graph(nodes, [float_input("x", [1, 4])], [float_input("y", [1, 4])], {},
                      path=tmp_path / "softsign.onnx")
    with pytest.raises(UserError) as error:
        import_onnx(path)
    assert "Softsign" in error.value.what and "my_softsign" in error.value.what
    assert all(op in error.value.hint for op in SUPPORTED_OPS)


def test_non_finite_weights_are_refused(tmp_path):
    weight = np.ones((3, 4), np.float32)
    weight[1, 2] = np.inf
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    path = make_graph(nodes, [float_input("x", [1, 4])], [float_input("y", [1, 3])], {"w": weight},
                      path=tmp_path / "inf.onnx")
    with pytest.raises(UserError, match="NaN or infinite"):
        import_onnx(path)


def test_ops_along_a_fixed_batch_axis_match_onnxruntime(tmp_path):
    """With a fixed batch of 1, ONNX axis 0 is an ordinary axis of size 1: graphs may transpose it,
    concatenate or pad along it, or broadcast a constant against it."""
    rng = np.random.default_rng(1)
    init = {"w1": rng.normal(size=(6, 4)).astype(np.float32),
            "w2": rng.normal(size=(5, 12)).astype(np.float32),
            "pads": np.array([1, 0, 0, 0], np.int64),
            "k": rng.normal(size=(2, 1, 6)).astype(np.float32),
            "flat": np.array([1, 12], np.int64),
            "w3": rng.normal(size=(3, 12)).astype(np.float32)}
    N = helper.make_node
    nodes = [
        N("Gemm", ["x", "w1"], ["h"], transB=1),                   # [1,6]
        N("Transpose", ["h"], ["t"], perm=[1, 0]),                 # [6,1]
        N("Relu", ["t"], ["r"]),
        N("Concat", ["t", "r"], ["cat"], axis=0),                  # [12,1]
        N("MatMul", ["w2", "cat"], ["m"]),                         # [5,1]
        N("Pad", ["m", "pads"], ["p"]),                            # [6,1]
        N("Transpose", ["p"], ["pt"], perm=[1, 0]),                # [1,6]
        N("Mul", ["pt", "k"], ["b"]),                              # [2,1,6]
        N("Reshape", ["b", "flat"], ["f"]),                        # [1,12]
        N("Gemm", ["f", "w3"], ["y"], transB=1),                   # [1,3]
    ]
    path = make_graph(nodes, [float_input("x", [1, 4])], [float_input("y", [1, 3])], init,
                      path=tmp_path / "axis0.onnx")
    model = import_onnx(path)
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.module(x)
    reference = onnxruntime_outputs(path, x)
    assert ours.shape == (16, 3)
    assert np.abs(ours.numpy() - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())
    assert np.ptp(reference, axis=0).min() > 1e-2


def test_graph_that_mixes_samples_is_caught(tmp_path):
    """A dynamic-batch graph whose sample i reads sample j: the module computes each sample on its
    own, so the onnxruntime check at import refuses it."""
    N = helper.make_node
    nodes = [N("Concat", ["x", "x"], ["cat"], axis=0),                  # [2N, 4]
             N("Reshape", ["cat", "shape"], ["r"]),                      # [N, 8]: rows mix samples
             N("Gemm", ["r", "w"], ["y"], transB=1)]
    path = make_graph(nodes, [float_input("x", ["N", 4])], [float_input("y", ["N", 2])],
                      {"shape": np.array([-1, 8], np.int64),
                       "w": np.random.default_rng(2).normal(size=(2, 8)).astype(np.float32)},
                      path=tmp_path / "mixing.onnx")
    with pytest.raises(UserError, match="differs from onnxruntime"):
        import_onnx(path)
    assert import_onnx(path, check=False).module(torch.rand(3, 4)).shape == (3, 2)


def test_output_that_is_not_one_logit_per_class_is_refused(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
             helper.make_node("Reshape", ["h", "shape"], ["y"])]
    path = make_graph(nodes, [float_input("x", [1, 4])], [float_input("y", [1, 3, 4])],
                      {"w": np.ones((12, 4), np.float32), "shape": np.array([1, 3, 4], np.int64)},
                      path=tmp_path / "grid.onnx")
    with pytest.raises(UserError, match=r"output has shape \[1, 3, 4\]"):
        import_onnx(path)


def test_unreadable_files_are_refused(tmp_path, model_paths):
    data = model_paths["small-cnn"].read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n")
    for path in (truncated, noise, text):
        with pytest.raises(UserError, match="is not a readable ONNX model"):
            import_onnx(path)
    with pytest.raises(UserError, match="does not exist"):
        import_onnx(tmp_path / "missing.onnx")
