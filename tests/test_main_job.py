"""The README's main job, end to end through the real command lines (small budget), and the
certify command's contract on a model without metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist_end_to_end.py"), "--out", str(out),
                             "--epochs", "1", "--finetune-epochs", "1", "--finetune-eps", "0.02",
                             "--finetune-limit", "3000", "--prune", "0.6", "--prune-limit", "1000", "--limit", "20"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model.safetensors", "model.hard.safetensors", "model.ibp.safetensors", "model.pruned.safetensors",
                 "model.onnx", "report.json", "report.png"):
        assert (out / name).is_file(), name
    # every step left its record in the model that went on to the next one
    from harden.io.loading import load_model

    pruned = load_model(out / "model.pruned.safetensors")
    runs = [record["run"] for record in pruned.history]
    assert runs == ["train", "finetune", "prune"]
    assert pruned.history[1]["train"] == "ibp" and pruned.history[1]["eps"] == 0.02
    assert [step["step"] for step in pruned.recipe] == ["spectral-norm", "prune"]
    # the exported ONNX carries the pruning: 60% of the conv/linear weights are real zeros
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer if t.dims and len(t.dims) >= 2]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.size for w in weights)
    assert abs(zeros / total - 0.6) < 0.01

    report = json.loads((out / "report.json").read_text())
    assert [r["eps"] for r in report["results"]] == [0.01, 0.05, 0.1]
    from certify.common.files import sha256_file

    assert report["model"]["sha256"] == sha256_file(out / "model.onnx")
    assert report["spec"]["methods"] == ["ibp", "crown"] and report["spec"]["dataset"] == "mnist"
    assert "torch" in report["tools"] and "auto_LiRPA" in report["tools"]
    small = report["results"][0]
    assert small["samples"] == 20 and len(small["per_sample"]) == 20
    # after one epoch (and the short fine-tuning and pruning) the CNN is right on most of these images,
    # and the cascade proves most at eps 0.01
    assert small["clean_accuracy"] >= 0.85
    assert small["certified_accuracy"] >= 0.5
    # Per sample, from the fields the summary is not computed from: a verified sample is correctly
    # classified with a positive margin bound, the clean accuracy is the share with prediction ==
    # label, and a sample verified at some eps is verified at every smaller one (falsified: at every
    # larger one), i.e. the cascade never contradicts itself across radii.
    verdicts = {}
    for r in report["results"]:
        samples = r["per_sample"]
        assert r["clean_accuracy"] == sum(s["prediction"] == s["label"] for s in samples) / len(samples)
        for s in samples:
            if s["verdict"] == "verified":
                assert s["prediction"] == s["label"] and s["margin_lower_bound"] > 0, s
            verdicts.setdefault(s["index"], []).append(s["verdict"])
    for index, path in verdicts.items():
        if "verified" in path:
            last = max(i for i, v in enumerate(path) if v == "verified")
            assert path[:last + 1] == ["verified"] * (last + 1), (index, path)
        if "falsified" in path:
            assert all(v == "falsified" for v in path[path.index("falsified"):]), (index, path)
    assert "certified" in result.stderr + result.stdout  # the table was printed
    # the second run reuses the trained model
    again = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist_end_to_end.py"), "--out", str(out),
                            "--finetune-epochs", "0", "--limit", "5"], capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0 and "reusing the trained model" in again.stdout


def test_certify_needs_data_for_foreign_onnx(tmp_path):
    model = ROOT.parent / "shared" / "vnncomp" / "mnistfc" / "mnist-net_256x2.onnx"
    if not model.is_file():
        import pytest

        pytest.skip("shared VNN-COMP models not present")
    bare = subprocess.run([sys.executable, "-m", "certify", str(model), "--eps", "0.02", "--limit", "5"],
                          capture_output=True, text=True)
    assert bare.returncode == 2 and "--data" in bare.stderr
    assert len(bare.stderr.strip().splitlines()) == 1
    report = tmp_path / "r.json"
    ok = subprocess.run([sys.executable, "-m", "certify", str(model), "--data", "mnist", "--eps", "0.02",
                         "--limit", "10", "--method", "crown", "--json", str(report)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    result = json.loads(report.read_text())["results"][0]
    assert result["samples"] == 10 and result["clean_accuracy"] >= 0.8
    bad_eps = subprocess.run([sys.executable, "-m", "certify", str(model), "--data", "mnist", "--eps", "1.5",
                              "--json", str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert bad_eps.returncode == 2 and "eps" in bad_eps.stderr and not (tmp_path / "bad.json").exists()
