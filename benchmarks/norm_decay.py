"""Norm decay (Liang & Huang 2021) against its finding: on MNIST and Fashion-MNIST, the small CNN
trained plain, with weight decay and with norm decay (linf and l1, two strengths each), then clean
and PGD accuracy and every layer's exact l1 / linf operator norm; the same norms for a PGD-trained
and an IBP-trained model of the same budget.

All models start from the same initialization and train `--epochs` epochs on the first
`--train-limit` training images (Adam 1e-3, batch 128, harden's training loop). Weight decay is
Adam's coupled L2 term; norm decay is `harden.layers.norm_decay.NormDecay` (momentum 0.5, the
subgradient added to the gradient before each step). The PGD model trains on PGD-`--train-steps`
points at linf eps `--eps`; the IBP model on IBP bounds at eps `--eps` (eps ramped over half the
epochs, kappa 1 -> 0.5). Norms are exact, on each layer's real input size (harden.layers.norms).
The evaluation attack is PGD-`--eval-steps` with a random start (the paper used AutoAttack).

    python -m benchmarks.norm_decay --json benchmarks/results/norm_decay.json --md benchmarks/results/norm_decay.md
    python -m benchmarks.norm_decay --datasets mnist --train-limit 2000 --epochs 1 --test-limit 200   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from torch import nn

from benchmarks.common import add_run_options, markdown_table, run_datasets
from benchmarks.common import table as new_table
from benchmarks.pgd_training import pgd_accuracy

INPUT_HW = {"0": (28, 28), "2": (14, 14), "5": None, "7": None}  # small CNN layer -> its input size


def recipes(args) -> dict[str, dict]:
    """Model name -> how it is trained (FinetuneConfig fields, or weight_decay)."""
    out = {"plain": {}, f"weight decay {args.weight_decay:g}": {"weight_decay": args.weight_decay}}
    for p in ("inf", "1"):
        for beta in args.betas:
            out[f"norm decay l{p} {beta:g}"] = {"norm_decay": beta, "norm_decay_p": p}
    out[f"PGD-{args.train_steps} trained"] = {"train": "pgd", "eps": args.eps, "steps": args.train_steps}
    out["IBP trained"] = {"train": "ibp", "eps": args.eps, "eps_schedule": "smooth"}
    return out


def layer_norms(module: nn.Module) -> dict[str, dict[str, float]]:
    from harden.layers.norms import l1_norm, linf_norm

    layers = dict(module.named_children())
    return {name: {"linf": linf_norm(layers[name], hw), "l1": l1_norm(layers[name], hw)} for name, hw in INPUT_HW.items()}


def train_with_weight_decay(bundle, train, *, epochs: int, weight_decay: float, seed: int, quiet: bool) -> None:
    """Clean training in harden's loop, with Adam's L2 weight decay (the finetune command has none)."""
    from harden.training.loop import Loop, TrainStep
    from harden.training.objectives import Clean

    torch.manual_seed(seed)
    module = bundle.module
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=weight_decay)
    Loop("weight decay", TrainStep(module, Clean(), lambda: None, touch_all=False), module, optimizer,
         train.x, train.y, epochs, 128, seed, torch.device("cpu"), quiet=quiet).run()
    module.eval()


def train_one(initial: nn.Module, train, recipe: dict, args, quiet: bool):
    from harden.io.bundle import Bundle
    from harden.training.finetune import FinetuneConfig, finetune

    bundle = Bundle(copy.deepcopy(initial), (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"},
                    data={"dataset": train.name, "classes": train.classes, "input_range": [0.0, 1.0]})
    if "weight_decay" in recipe:
        train_with_weight_decay(bundle, train, epochs=args.epochs, weight_decay=recipe["weight_decay"],
                                seed=args.seed, quiet=quiet)
    else:
        config = FinetuneConfig(**{"train": "clean", **recipe}, epochs=args.epochs, seed=args.seed)
        finetune(bundle, train, None, config, quiet=quiet)
    return bundle.module.eval()


def run_dataset(dataset: str, args, quiet: bool) -> dict:
    from certify.data.datasets import load_dataset
    from harden.io.zoo import small_cnn
    from harden.training.train import accuracy

    train = load_dataset(dataset, split="train").subset(args.train_limit)
    test = load_dataset(dataset, split="test").subset(args.test_limit)
    torch.manual_seed(args.seed)
    initial = small_cnn()
    rows = {"initialization": {"norms": layer_norms(initial)}}
    for name, recipe in recipes(args).items():
        began = time.perf_counter()
        module = train_one(initial, train, recipe, args, quiet)
        seconds = round(time.perf_counter() - began, 1)
        rows[name] = {"clean": accuracy(module, test, device=torch.device("cpu")),
                      "pgd": pgd_accuracy(module, test, eps=args.eps, steps=args.eval_steps, seed=args.seed),
                      "norms": layer_norms(module), "train_seconds": seconds}
        print(f"{dataset} {name}: {json.dumps(rows[name])}", file=sys.stderr)
    return {"train_samples": len(train), "test_samples": len(test), "measured": rows}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="mnist,fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--betas", type=float, nargs=2, default=[1e-3, 1e-2], help="the two norm decay strengths")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--eps", type=float, default=0.1, help="linf radius of PGD evaluation and PGD/IBP training")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--eval-steps", type=int, default=20)
    add_run_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run_datasets(parse(argv), "norm-decay", run_dataset, markdown, show, layers=list(INPUT_HW))


COLUMNS = ("data", "model", "clean", "PGD", "linf norms conv1 / conv2 / fc1 / fc2", "product",
           "l1 norms conv1 / conv2 / fc1 / fc2", "train s")


def table_rows(document: dict) -> list[list]:
    rows = []
    for dataset, result in document["results"].items():
        for name, row in result["measured"].items():
            norms = row["norms"]
            product = 1.0
            for layer in document["layers"]:
                product *= norms[layer]["linf"]
            cells = [dataset, name, f"{100 * row['clean']:.1f}" if "clean" in row else "",
                     f"{100 * row['pgd']:.1f}" if "pgd" in row else "",
                     " / ".join(f"{norms[layer]['linf']:.2f}" for layer in document["layers"]), f"{product:.3g}",
                     " / ".join(f"{norms[layer]['l1']:.2f}" for layer in document["layers"]),
                     f"{row['train_seconds']:.0f}" if "train_seconds" in row else ""]
            rows.append(cells)
    return rows


def markdown(document: dict) -> list[str]:
    s = document["settings"]
    first = next(iter(document["results"].values()))
    lines = [f"Small CNN, {s['epochs']} epochs on the first {first['train_samples']} training images from one "
             f"initialization (its norms: the first row). Clean and PGD-{s['eval_steps']} (linf eps {s['eps']:g}, "
             f"random start) accuracy in % on {first['test_samples']} test images; exact operator norms per layer on "
             f"its input size; product = the linf Lipschitz upper bound. Training seconds on a shared "
             f"2-core CPU machine, {s['threads']} thread(s).", ""]
    return lines + markdown_table(COLUMNS, table_rows(document))


def show(document: dict) -> None:
    from rich.console import Console

    out = new_table("Norm decay, weight decay, PGD and IBP training: accuracy (%) and exact layer norms", COLUMNS)
    for row in table_rows(document):
        out.add_row(*row)
    Console().print(out)
    print(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
