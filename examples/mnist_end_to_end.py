"""The main job: MNIST end to end through the two command lines, exactly as a user runs them.

    python examples/mnist_end_to_end.py [--out runs/mnist] [--retrain] [--limit 200] [--prune 0.9]

1. harden train    -- the small CNN on real MNIST (reused when the output folder already has it)
2. harden convert  -- spectral normalization of the true operator norm of every layer
3. harden finetune -- brief certified (IBP) fine-tuning at eps 0.1 with an eps ramp
4. harden prune    -- only with --prune S: sparsity S under a condition-number constraint, PGD in the loop
5. harden export   -- ONNX with certification metadata, parity-checked against onnxruntime
6. certify         -- 200 test images at eps 0.01, 0.05 and 0.1: PGD attack, then IBP, then CROWN
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
    parser.add_argument("--finetune-epochs", type=int, default=2, help="IBP fine-tuning epochs (0: skip)")
    parser.add_argument("--finetune-eps", type=float, default=0.1, help="radius of the IBP fine-tuning")
    parser.add_argument("--finetune-limit", type=int, default=None, help="fine-tune on the first N training images")
    parser.add_argument("--prune", type=float, default=None, metavar="S", help="also prune to sparsity S (e.g. 0.9)")
    parser.add_argument("--prune-limit", type=int, default=20000, help="training images of the pruning run")
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
    current = hardened
    if args.finetune_epochs > 0:
        # A short IBP run: eps ramps 0 -> 0.1 over the first epoch, then holds (clean/robust mix 1 -> 0.5).
        # The ramp needs its ~470 steps: squeezed into a few dozen, IBP training collapses the accuracy.
        tuned = out / "model.ibp.safetensors"
        limit = ["--limit", str(args.finetune_limit)] if args.finetune_limit else []
        run("harden", "finetune", str(current), "--train", "ibp", "--eps", str(args.finetune_eps), "--epochs", str(args.finetune_epochs),
            "--eps-ramp-epochs", "1", *limit, "--seed", str(args.seed), "-o", str(tuned))
        current = tuned
    if args.prune is not None:
        pruned = out / "model.pruned.safetensors"
        run("harden", "prune", str(current), "--sparsity", str(args.prune), "--kappa-max", "100", "--train", "pgd",
            "--eps", "0.1", "--steps", "3", "--epochs", "1", "--limit", str(args.prune_limit),
            "--seed", str(args.seed), "-o", str(pruned))
        current = pruned
    run("harden", "export", str(current), "-o", str(onnx_file))
    run("certify", str(onnx_file), "--eps", "0.01", "--eps", "0.05", "--eps", "0.1", "--method", "ibp,crown",
        "--limit", str(args.limit), "--seed", str(args.seed), "--json", str(report), "--plot", str(out / "report.png"))
    print(f"\nmain job done in {time.perf_counter() - started:.0f} s; report: {report}")


if __name__ == "__main__":
    main()
