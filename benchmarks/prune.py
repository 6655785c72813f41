"""Benchmark of pruning under a condition-number constraint (harden.pruning.prune).

The method's central claim, measured directly: at 90 / 95 / 99% sparsity the condition numbers of
plainly pruned layers blow up, and the constraint keeps them bounded, to the benefit of robustness.
For each model (the small CNN and the MLP on MNIST) one dense base model is trained once; then,
for every sparsity, two runs start from that same base with the same budget (epochs, samples,
training objective, seed, schedule, transformed-l1 setting) and differ ONLY in the condition
constraint (hinge at --kappa-max, weight --cond-weight, vs none). Reported per run:
  - max over the pruned layers of kappa of the full weight matrix (conv: C_out x C_in*k*k); inf
    when a layer is rank-deficient (e.g. a unit whose weights were all pruned), and of the live
    part (without all-zero rows/columns), which is what the constraint can act on;
  - on the same first --eval test images: clean accuracy, PGD accuracy (linf, --pgd-steps steps,
    one restart) at --eps, and CROWN-verified accuracy (certify.bounds.bounder.MarginBounder, method crown:
    the same bound, IBP reference bounds included, that `certify` runs) on the baked module, i.e. what
    the ONNX export holds, at --crown-eps.

    python -m benchmarks.prune                                   # defaults below, the full grid takes tens of minutes
    python -m benchmarks.prune --models mlp --sparsities 0.9 --json out.json

Writes the JSON document (--json, default benchmarks/results/prune.json) and prints a readable
table (markdown, stdout).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from certify.attacks.gradient import PGD
from certify.bounds.bounder import MarginBounder
from certify.data.datasets import load_dataset
from certify.common.files import atomic_path
from certify.common.progress import say
from harden.io.bundle import Bundle
from harden.io.bundle_file import load_bundle, save_bundle
from harden.io.export import baked_module
from harden.pruning.prune import PruneConfig, layer_kappas, prune
from harden.layers.masks import prunable_layers
from harden.training.train import accuracy, train_clean
from harden.io.zoo import ARCHITECTURES

SHAPE = (1, 28, 28)


def base_model(name: str, train, test, *, epochs: int, seed: int, cache: Path) -> Bundle:
    """The dense, clean-trained starting point (cached: both arms of every sparsity share it)."""
    path = cache / f"{name}-base-e{epochs}-n{len(train)}-s{seed}.safetensors"
    if path.exists():
        return load_bundle(path)
    torch.manual_seed(seed)
    bundle = Bundle(ARCHITECTURES[name](SHAPE, 10), SHAPE, 10, {"kind": "zoo", "name": name},
                    data={"dataset": "mnist", "classes": test.classes, "input_range": [0.0, 1.0]})
    train_clean(bundle, train, test, epochs=epochs, seed=seed, quiet=True)
    cache.mkdir(parents=True, exist_ok=True)
    save_bundle(bundle, path)
    return bundle


def pgd_accuracy(module, test, eps: float, steps: int, seed: int) -> float:
    attack = PGD(module, eps, steps=steps, generator=torch.Generator().manual_seed(seed))
    correct = 0
    for start in range(0, len(test), 500):
        x, y = test.x[start:start + 500], test.y[start:start + 500]
        x_adv = attack(x, y)
        with torch.no_grad():
            correct += int((module(x_adv).argmax(1) == y).sum())
    return correct / len(test)


def crown_accuracy(module, test, eps: float) -> float:
    bounder = MarginBounder(module, SHAPE)
    verified = 0
    for start in range(0, len(test), 100):
        x, y = test.x[start:start + 100], test.y[start:start + 100]
        lower = bounder.lower_margins((x - eps).clamp(0, 1), (x + eps).clamp(0, 1), y, "crown")
        verified += int((lower > 0).all(dim=1).sum())
    return verified / len(test)


def measure(bundle: Bundle, test, args) -> dict:
    names = [name for name, _ in prunable_layers(bundle.module)]
    full = layer_kappas(bundle.module, names)
    live = layer_kappas(bundle.module, names, live=True)
    module = baked_module(bundle.module).eval()  # what the ONNX export holds: real zeros
    evaluation = test.subset(args.eval)
    return {
        "max_kappa": _json(max(full.values())), "max_live_kappa": _json(max(live.values())),
        "kappa": {name: _json(value) for name, value in full.items()},
        "live_kappa": {name: _json(value) for name, value in live.items()},
        "clean_accuracy": accuracy(module, evaluation, device=torch.device("cpu")),
        "pgd_accuracy": pgd_accuracy(module, evaluation, args.eps, args.pgd_steps, args.seed),
        "crown_verified_accuracy": crown_accuracy(module, evaluation, args.crown_eps),
    }


def _json(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"


def _shown(value) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def table(document: dict) -> str:
    setup = document["setup"]
    lines = [f"first {setup['eval']} MNIST test images; PGD-{setup['pgd_steps']} at eps {setup['eps']:g}, CROWN at "
             f"eps {setup['crown_eps']:g}; constraint = hinge kappa_max {setup['kappa_max']:g} "
             f"x {setup['cond_weight']:g}; prune training {setup['train']}"
             f"{' eps ' + format(setup['train_eps'], 'g') if setup['train'] != 'clean' else ''}, "
             f"{setup['epochs']} epochs on {setup['limit']} images, {setup['scope']} magnitude, cubic schedule",
             "",
             "| model | sparsity | constraint | max kappa (full) | max kappa (live) | clean | PGD | CROWN-verified | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in document["rows"]:
        m = row["metrics"]
        lines.append(f"| {row['model']} | {row['sparsity']:.0%} | {'yes' if row['constraint'] else 'no'} | "
                     f"{_shown(m['max_kappa'])} | {_shown(m['max_live_kappa'])} | {100 * m['clean_accuracy']:.1f}% | "
                     f"{100 * m['pgd_accuracy']:.1f}% | {100 * m['crown_verified_accuracy']:.1f}% | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small-cnn,mlp")
    parser.add_argument("--sparsities", default="0.9,0.95,0.99")
    parser.add_argument("--kappa-max", type=float, default=100.0)
    parser.add_argument("--cond-weight", type=float, default=1.0)
    parser.add_argument("--tsc-weight", type=float, default=0.0)
    parser.add_argument("--scope", default="global", choices=("global", "per-layer"))
    parser.add_argument("--train", default="pgd", choices=("clean", "pgd", "trades"))
    parser.add_argument("--train-eps", type=float, default=0.1)
    parser.add_argument("--attack-steps", type=int, default=5, help="PGD steps of the training attack")
    parser.add_argument("--epochs", type=int, default=2, help="pruning + fine-tuning epochs per run")
    parser.add_argument("--limit", type=int, default=10000, help="training images per run")
    parser.add_argument("--base-epochs", type=int, default=2)
    parser.add_argument("--base-limit", type=int, default=30000)
    parser.add_argument("--eps", type=float, default=0.1, help="PGD evaluation radius")
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--eval", type=int, default=500, help="test images for every accuracy")
    parser.add_argument("--crown-eps", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "harden" / "benchmark-prune",
                        help="where the dense base models are kept between runs")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/prune.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.json.parent.mkdir(parents=True, exist_ok=True)

    train_all = load_dataset("mnist", "train")
    test = load_dataset("mnist", "test")
    setup = {"train": args.train, "train_eps": args.train_eps, "attack_steps": args.attack_steps,
             "epochs": args.epochs, "limit": args.limit, "scope": args.scope, "kappa_max": args.kappa_max,
             "cond_weight": args.cond_weight, "tsc_weight": args.tsc_weight, "base_epochs": args.base_epochs,
             "base_limit": args.base_limit, "eps": args.eps, "pgd_steps": args.pgd_steps, "eval": args.eval,
             "crown_eps": args.crown_eps, "seed": args.seed,
             "schedule": "cubic, 10 events over the first half of the steps"}
    document = {"benchmark": "prune", "setup": setup, "machine": {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine()}, "bases": {}, "rows": []}
    for name in args.models.split(","):
        started = time.perf_counter()
        base = base_model(name, train_all.subset(args.base_limit), test, epochs=args.base_epochs, seed=args.seed,
                          cache=args.cache)
        document["bases"][name] = {**measure(base, test, args), "seconds": round(time.perf_counter() - started, 1)}
        say(f"{name} dense: {document['bases'][name]}")
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            for constraint in (False, True):
                started = time.perf_counter()
                bundle = copy.deepcopy(base)
                config = PruneConfig(sparsity=sparsity, scope=args.scope,
                                     kappa_max=args.kappa_max if constraint else None,
                                     cond_weight=args.cond_weight if constraint else None,
                                     tsc_weight=args.tsc_weight, train=args.train,
                                     eps=args.train_eps if args.train != "clean" else 0.0, steps=args.attack_steps,
                                     epochs=args.epochs, seed=args.seed)
                record = prune(bundle, train_all.subset(args.limit), None, config, quiet=True)
                row = {"model": name, "sparsity": sparsity, "constraint": constraint,
                       "reached_sparsity": record["final"]["sparsity"], "metrics": measure(bundle, test, args),
                       "events": record["events"], "seconds": round(time.perf_counter() - started, 1)}
                document["rows"].append(row)
                say(f"{name} {sparsity:.0%} constraint={constraint}: {row['metrics']} ({row['seconds']} s)")
                with atomic_path(args.json) as tmp:  # partial results survive an interrupted run
                    tmp.write_text(json.dumps(document, indent=1))
    with atomic_path(args.json) as tmp:
        tmp.write_text(json.dumps(document, indent=1))
    sys.stdout.write(table(document) + "\n")


if __name__ == "__main__":
    main()
