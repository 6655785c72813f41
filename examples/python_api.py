"""The Python API on a torch module and tensors, without model files until the export.

    python examples/python_api.py [--out runs/api] [--train 5000] [--certify 100]

1. a plain MLP, trained briefly on MNIST tensors      harden.finetune(model, x, y, objective="clean")
2. spectral normalization of every layer              harden.spectral_normalize(model, beta, input_shape=...)
3. PGD fine-tuning from a DataLoader                  harden.finetune(model, loader, objective="pgd", eps=...)
4. pruning to 50% sparsity                            harden.prune(model, x, y, sparsity=0.5)
5. certification of the module itself                 certify.certify_module(model, x, y, eps=[...])
6. ONNX export, and the same certification on the file certify.certify_model("model.onnx", [...])
The last line printed is a JSON summary (certified accuracy per eps, module and file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import certify
import harden
from certify.data.datasets import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/api"), help="output folder (the ONNX file)")
    parser.add_argument("--train", type=int, default=5000, help="training images")
    parser.add_argument("--certify", type=int, default=100, help="test images to certify")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    train, test = load_dataset("mnist", split="train"), load_dataset("mnist", split="test")
    x, y = train.x[:args.train], train.y[:args.train]
    x_test, y_test = test.x[:args.certify], test.y[:args.certify]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))
    record = harden.finetune(model, x, y, objective="clean", epochs=1, seed=0, test=(x_test, y_test))
    print(f"clean training: test accuracy {record['test_clean_accuracy']:.1%}")

    model = harden.spectral_normalize(model, beta=4.0, input_shape=(1, 28, 28))
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    harden.finetune(model, loader, objective="pgd", eps=0.05, epochs=1, steps=5, seed=0)
    harden.prune(model, x, y, sparsity=0.5, epochs=1, seed=0)

    eps = [0.01, 0.02]
    results = certify.certify_module(model, x_test, y_test, eps=eps, methods=("ibp", "crown"), seed=0)
    for result in results:
        unknown = [s.index for s in result.samples if s.verdict == "unknown"]
        print(f"module, eps {result.eps:g}: {result.summary()['certified_accuracy']:.1%} certified, "
              f"{len(unknown)} unknown")

    onnx_path = args.out / "model.onnx"
    harden.export_module(model, onnx_path, input_shape=(1, 28, 28), dataset="mnist", classes=test.classes)
    run = certify.certify_model(onnx_path, eps, limit=args.certify, methods=("ibp", "crown"), seed=0, quiet=True)
    summary = {"eps": eps,
               "module_certified": [r.summary()["certified_accuracy"] for r in results],
               "file_certified": [r.summary()["certified_accuracy"] for r in run.results],
               "file_sha256": run.model_sha256}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
