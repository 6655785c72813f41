"""Regression tests of the cascade's attack seeding and of verdicts reused across eps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from certify.attacks.gradient import DIVERSIFY_STEPS
from certify.bounds.bounder import MarginBounder
from certify.data.datasets import load_dataset
from certify.onnx_import.certifiable import load_certifiable
from certify.verdicts.file_outputs import FileOutputs
from certify.verdicts.cascade import FALSIFIED, VERIFIED, CascadeOptions, Verdict, certify_batch
from certify.verdicts.dataset import _implied


class _Recorder(nn.Module):
    """The network unchanged, keeping a copy of every input it is run on."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


def _robust_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        net[3].bias.copy_(torch.tensor([100.0, 0.0, 0.0]))  # class 0 wins everywhere: no restart stops early
    return net.eval()


def test_every_attack_restart_starts_at_its_own_point():
    net = _robust_net()
    steps = 3
    x = torch.rand(2, 1, 6, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(2, dtype=torch.long)
    box = ((x - 0.3).clamp(0, 1), (x + 0.3).clamp(0, 1))
    recorder = _Recorder(net)
    options = CascadeOptions(methods=(), attack_steps=steps, attack_restarts=3, seed=5)
    verdicts = certify_batch(recorder, MarginBounder(net, (1, 6)), x, y, box, [0, 1], options)
    assert [v.verdict for v in verdicts] == ["unknown", "unknown"]
    # forwards: the clean prediction, then steps + 1 per restart: restart 1 from the clean image,
    # restarts 2 and 3 from random points of the box, each first diversified (DIVERSIFY_STEPS more)
    seen, random_restart = recorder.seen, DIVERSIFY_STEPS + steps + 1
    assert len(seen) == 1 + (steps + 1) + 2 * random_restart
    starts = [seen[1], seen[2 + steps], seen[2 + steps + random_restart]]
    assert torch.equal(starts[0], torch.minimum(torch.maximum(x, box[0]), box[1]))
    for a in range(3):
        for b in range(a + 1, 3):
            for i in range(2):
                assert not torch.equal(starts[a][i], starts[b][i]), (a, b, i)
    for point in seen[1:]:
        assert ((point >= box[0]) & (point <= box[1])).all()


def _verdict(verdict: str, method: str, bound: float) -> Verdict:
    return Verdict(index=3, label=1, prediction=1, verdict=verdict, method=method, margin_lower_bound=bound,
                   seconds=0.1)


def test_reused_falsified_verdict_carries_no_margin_bound():
    eps_values = [0.01, 0.05]
    # falsified at 0.01 after CROWN ran (so it has a bound over the 0.01 box), nothing at 0.05 yet
    per_eps = [[_verdict(FALSIFIED, "pgd", -0.2)], [None]]
    reused = _implied(per_eps, eps_values, 1, 0)
    assert reused.verdict == FALSIFIED and reused.reused_from == 0.01
    assert reused.margin_lower_bound is None
    assert reused.to_json()["margin_lower_bound"] is None


def test_reused_verified_verdict_keeps_its_margin_bound():
    eps_values = [0.01, 0.05]
    per_eps = [[None], [_verdict(VERIFIED, "crown", 0.3)]]
    reused = _implied(per_eps, eps_values, 0, 0)
    assert reused.verdict == VERIFIED and reused.reused_from == 0.05
    assert reused.margin_lower_bound == 0.3


@pytest.fixture(scope="module")
def cnn_onnx(trained_small_cnn, tmp_path_factory):
    from harden.io.export import export_onnx

    path = tmp_path_factory.mktemp("defects") / "cnn.onnx"
    export_onnx(trained_small_cnn, path)
    return path


def _off_by_a_bias(cnn_onnx, wrong_class: int) -> nn.Module:
    """The imported module with a large bias on one class: it no longer computes the file's function."""
    module = copy.deepcopy(load_certifiable(cnn_onnx).module)
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias[wrong_class] += 1e3
    return module.eval()


def test_a_module_that_is_not_the_file_is_refused(cnn_onnx):
    from certify.common.errors import UserError

    test = load_dataset("mnist", "test")
    outputs = FileOutputs(cnn_onnx)
    assert outputs.check(load_certifiable(cnn_onnx).module, test.x[:8]) < 1e-3
    with pytest.raises(UserError, match="differs from onnxruntime"):
        outputs.check(_off_by_a_bias(cnn_onnx, 0), test.x[:8])


def test_counterexamples_count_only_when_onnxruntime_confirms_them(cnn_onnx):
    test = load_dataset("mnist", "test")
    keep = test.y[:40] != 3
    x, y = test.x[:40][keep][:6], test.y[:40][keep][:6]
    module = _off_by_a_bias(cnn_onnx, 3)  # torch says "3" everywhere; the file does not
    box = ((x - 0.01).clamp(0, 1), (x + 0.01).clamp(0, 1))
    options = CascadeOptions(methods=(), attack_steps=5, attack_restarts=2)
    bounder = MarginBounder(module, (1, 28, 28))
    torch_only = certify_batch(module, bounder, x, y, box, list(range(6)), options)
    assert all(v.verdict == FALSIFIED for v in torch_only)  # what the module alone would report
    confirmed = certify_batch(module, bounder, x, y, box, list(range(6)), options, file_outputs=FileOutputs(cnn_onnx))
    assert not any(v.verdict == FALSIFIED for v in confirmed)
