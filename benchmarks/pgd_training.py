"""Small CNN on MNIST at l-infinity eps 0.1: plain vs PGD-trained vs spectral norm + PGD-trained,
clean accuracy and accuracy under PGD-50 (random start), all measured in the same run.

All three start from the same clean-trained model (the "plain" row, `--clean-epochs` of clean
training); the two others are fine-tuned from it with `harden.training.finetune` (--train pgd, PGD with
`--steps` steps of 2.5 * eps / steps, random start, attack labels = the model's predictions) for
`--epochs` epochs; "SN + PGD" is converted with spectral normalization (beta) first.

    python benchmarks/pgd_training.py                                   # modest budget
    python benchmarks/pgd_training.py --epochs 10 --test-limit 10000    # a fuller one
No paper number is quoted for this row; the comparison is between the three models.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from benchmarks.common import finish


def pgd_accuracy(module, test, *, eps: float, steps: int, batch_size: int = 500, seed: int = 0) -> float:
    from certify.attacks.gradient import PGD

    module.eval()
    attack = PGD(module, eps, norm="inf", steps=steps, random_start=True, generator=torch.Generator().manual_seed(seed))
    correct = 0
    for start in range(0, len(test), batch_size):
        x, y = test.x[start:start + batch_size], test.y[start:start + batch_size]
        x_adv = attack(x, y)
        with torch.no_grad():
            correct += int((module(x_adv).argmax(1) == y).sum())
    return correct / len(test)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--clean-epochs", type=int, default=2, help="clean training of the starting model")
    parser.add_argument("--epochs", type=int, default=2, help="PGD fine-tuning epochs")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps during training")
    parser.add_argument("--eval-steps", type=int, default=50, help="PGD steps of the evaluation")
    parser.add_argument("--beta", type=float, default=4.0, help="spectral norm bound per layer (SN + PGD row)")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training images (default all 60k)")
    parser.add_argument("--test-limit", type=int, default=1000, help="first N test images (10000 for the full set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from certify.data.datasets import load_dataset
    from harden.convert import convert
    from harden.io.bundle import Bundle
    from harden.io.zoo import small_cnn
    from harden.training.finetune import FinetuneConfig, finetune
    from harden.training.train import accuracy, train_clean

    train = load_dataset("mnist", split="train").subset(args.train_limit)
    test = load_dataset("mnist", split="test").subset(args.test_limit)
    quiet = not sys.stderr.isatty()
    torch.manual_seed(args.seed)
    plain = Bundle(small_cnn(), (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"},
                   data={"dataset": "mnist", "classes": train.classes, "input_range": [0.0, 1.0]})
    began = time.perf_counter()
    train_clean(plain, train, test, epochs=args.clean_epochs, seed=args.seed, quiet=quiet)
    seconds = {"plain": round(time.perf_counter() - began, 1)}
    models = {"plain": plain}
    for name in ("pgd", "sn+pgd"):
        bundle = copy.deepcopy(plain)
        began = time.perf_counter()
        if name == "sn+pgd":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # power iteration on one sample: one thread is faster
            convert(bundle, spectral_norm=args.beta)
            torch.set_num_threads(threads)
        config = FinetuneConfig(train="pgd", eps=args.eps, epochs=args.epochs, steps=args.steps, seed=args.seed)
        finetune(bundle, train, None, config, quiet=quiet)
        seconds[name] = round(time.perf_counter() - began, 1)
        models[name] = bundle
    rows = {}
    for name, bundle in models.items():
        rows[name] = {"clean_accuracy": accuracy(bundle.module, test, device=torch.device("cpu")),
                      f"pgd{args.eval_steps}_accuracy": pgd_accuracy(bundle.module, test, eps=args.eps,
                                                                      steps=args.eval_steps, seed=args.seed),
                      "train_seconds": seconds[name]}
    document = {"benchmark": "small-cnn-pgd-training", "eps_linf": args.eps, "train_steps": args.steps,
                "eval_steps": args.eval_steps, "clean_epochs": args.clean_epochs, "pgd_epochs": args.epochs,
                "beta": args.beta, "train_samples": len(train), "test_samples": len(test),
                "threads": args.threads, "measured": rows}
    return finish(document, args.json, show)


def show(document: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    key = f"pgd{document['eval_steps']}_accuracy"
    table = Table(title=f"small CNN, MNIST linf eps {document['eps_linf']:g}: {document['pgd_epochs']} epochs of "
                        f"PGD-{document['train_steps']} training, {document['test_samples']} test images")
    for column in ("model", "clean acc", f"PGD-{document['eval_steps']} acc", "train s"):
        table.add_column(column, justify="right")
    labels = {"plain": f"plain ({document['clean_epochs']} clean epochs)", "pgd": "PGD-trained",
              "sn+pgd": f"SN beta={document['beta']:g} + PGD"}
    for name, row in document["measured"].items():
        table.add_row(labels[name], f"{100 * row['clean_accuracy']:.1f}", f"{100 * row[key]:.1f}",
                      f"{row['train_seconds']:.0f}")
    Console().print(table)
    print(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
