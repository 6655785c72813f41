"""The main job: MNIST end to end through the two command lines, exactly as a user runs them.

    python examples/mnist_end_to_end.py [--out runs/mnist] [--retrain] [--limit 200]

1. harden train    -- the small CNN on real MNIST (reused when the output folder already has it)
2. harden convert  -- spectral normalization of the true operator norm of every layer
3. harden export   -- ONNX with certification metadata, parity-checked against onnxruntime
4. certify         -- 200 test images at eps 0.01 and 0.05 with CROWN (plus the PGD attack)
Each step prints the command it runs, so the output doubles as a tutorial.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*args: str) -> None:
    command = [str(BIN / args[0]), *args[1:]]
    print(f"\n$ {shlex.join(args)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/mnist"), help="output folder")
    parser.add_argument("--retrain", action="store_true", help="train again even if a model exists")
    parser.add_argument("--limit", type=int, default=200, help="test images to certify")
    parser.add_argument("--epochs", type=int, default=4, help="clean training epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model.safetensors"
    hardened = out / "model.hard.safetensors"
    onnx_file = out / "model.onnx"
    report = out / "report.json"
    started = time.perf_counter()

    if args.retrain or not model.exists():
        run("harden", "train", "--data", "mnist", "--arch", "small-cnn", "--epochs", str(args.epochs),
            "--seed", str(args.seed), "-o", str(model))
    else:
        print(f"reusing the trained model {model} (--retrain to train again)")
    run("harden", "convert", str(model), "-o", str(hardened))
    run("harden", "export", str(hardened), "-o", str(onnx_file))
    run("certify", str(onnx_file), "--eps", "0.01", "--eps", "0.05", "--method", "crown",
        "--limit", str(args.limit), "--seed", str(args.seed), "--json", str(report))
    print(f"\nmain job done in {time.perf_counter() - started:.0f} s; report: {report}")


if __name__ == "__main__":
    main()
