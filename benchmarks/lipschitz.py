"""What spectral normalization buys at l2: clean, PGD-l2 and certified l2 accuracy on MNIST.

For the small CNN and Farnia et al.'s MLP (one hidden layer of 512 ELU units), five models each,
all from the same initialization and data order: plain (cross-entropy), spectrally normalized with
beta 1, 2 and 4 (`harden.convert`, then the same cross-entropy training), and PGD-l2-trained at
the paper's radius (`harden.training.finetune --train pgd --norm 2`). On a test subset, at
eps = 0.05 x mean ||x||_2 of the training images (Farnia et al.'s radius) and at 0.1, 0.25, 0.5:

  - clean accuracy, and PGD-l2 accuracy (margin loss, `--pgd-steps` steps, `--pgd-restarts` restarts);
  - certified accuracy by the Lipschitz stage alone (certify.bounds.lipschitz) and by the full
    cascade (certify.verdicts.cascade: lipschitz, IBP, CROWN, alpha-CROWN between PGD restarts),
    for the MLP too (its ELU is bounded by certify.bounds.activations);
  - seconds per sample of each bound stage on its own (all of the subset at the paper's radius,
    alpha-CROWN on `--alpha-limit` samples), and of the whole cascade.

The baseline of every row is the plain model of the same architecture, in the same run.

    python benchmarks/lipschitz.py --json benchmarks/results/lipschitz.json --md benchmarks/results/lipschitz.md
    python benchmarks/lipschitz.py --train-limit 2000 --test-limit 50 --archs small-cnn   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

EPS_FIXED = (0.1, 0.25, 0.5)
VARIANTS = ("plain", "pgd", "sn1", "sn2", "sn4")  # the baselines first: a run cut short keeps them
ARCHS = ("mlp-elu-512", "small-cnn")  # the cheap one first: a run cut short keeps its rows
SHAPE = (1, 28, 28)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--epochs", type=int, default=1, help="epochs of cross-entropy training (plain and SN)")
    parser.add_argument("--pgd-epochs", type=int, default=1, help="epochs of PGD-l2 training")
    parser.add_argument("--pgd-train-steps", type=int, default=5)
    parser.add_argument("--train-limit", type=int, default=None, help="first N training images (default all 60k)")
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--cascade-limit", type=int, default=100, help="first N test images of the full cascade")
    parser.add_argument("--cascade-methods", default="lipschitz,ibp,crown",
                        help="bound stages of the full cascade (alpha-crown is timed alone: see --alpha-limit)")
    parser.add_argument("--stage-limit", type=int, default=50, help="samples each bound stage is timed on alone")
    parser.add_argument("--alpha-limit", type=int, default=1, help="samples alpha-CROWN is timed on alone (plain models)")
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--pgd-restarts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from benchmarks.farnia_mnist import farnia_eps
    from certify.data.datasets import load_dataset

    train = load_dataset("mnist", split="train").subset(args.train_limit)
    test = load_dataset("mnist", split="test").subset(args.test_limit)
    paper_eps = farnia_eps(train)
    eps_values = [paper_eps, *EPS_FIXED]
    document = {"benchmark": "lipschitz-l2-mnist", "paper_eps": paper_eps, "eps": eps_values,
                "train_samples": len(train), "test_samples": len(test), "epochs": args.epochs,
                "pgd_epochs": args.pgd_epochs, "pgd_train_steps": args.pgd_train_steps,
                "pgd_steps": args.pgd_steps, "pgd_restarts": args.pgd_restarts, "alpha_limit": args.alpha_limit,
                "stage_limit": args.stage_limit, "cascade_limit": min(args.cascade_limit, len(test)),
                "cascade_methods": args.cascade_methods, "threads": args.threads, "rows": []}
    for arch in args.archs.split(","):
        for variant in args.variants.split(","):
            began = time.perf_counter()
            module = _trained(arch, variant, train, paper_eps, args)
            trained = time.perf_counter() - began
            row = {"arch": arch, "variant": variant, "train_seconds": round(trained, 1),
                   **_measure(module, arch, variant, test, eps_values, args)}
            document["rows"].append(row)
            print(json.dumps(row), flush=True)
            _write(document, args)  # a run cut short still leaves the rows it finished
    show(document)
    _write(document, args)
    return document


def _write(document: dict, args) -> None:
    from certify.common.files import atomic_path

    for path, text in ((args.json, json.dumps(document, indent=1) + "\n"), (args.md, markdown(document))):
        if path:
            with atomic_path(path) as tmp:
                tmp.write_text(text)


def _trained(arch: str, variant: str, train, paper_eps: float, args) -> torch.nn.Module:
    """One model of the grid, trained; spectral normalization baked into plain weights."""
    from harden.convert import convert
    from harden.io.bundle import Bundle
    from harden.io.zoo import ARCHITECTURES
    from harden.layers.spectral import bake
    from harden.training.finetune import FinetuneConfig, finetune
    from harden.training.train import train_clean

    torch.manual_seed(args.seed)
    bundle = Bundle(ARCHITECTURES[arch](SHAPE, 10), SHAPE, 10, {"kind": "zoo", "name": arch},
                    data={"dataset": "mnist", "classes": train.classes, "input_range": [0.0, 1.0]})
    if variant.startswith("sn"):
        convert(bundle, spectral_norm=float(variant[2:]))
    if variant == "pgd":
        config = FinetuneConfig(train="pgd", eps=paper_eps, norm="2", epochs=args.pgd_epochs,
                                steps=args.pgd_train_steps, seed=args.seed, eval_limit=1)
        finetune(bundle, train, None, config, quiet=True)
    else:
        train_clean(bundle, train, train.subset(1), epochs=args.epochs, seed=args.seed, quiet=True)
    return bake(copy.deepcopy(bundle.module)).eval()


def _measure(module, arch: str, variant: str, test, eps_values: list[float], args) -> dict:
    from certify.attacks.gradient import PGD
    from certify.bounds.bounder import MarginBounder

    x, y = test.x.reshape(-1, *SHAPE), test.y
    bounder = MarginBounder(module, SHAPE)
    started = time.perf_counter()
    chain = bounder.lipschitz
    out = {"lipschitz_seconds_setup": round(time.perf_counter() - started, 3),
           "lipschitz_l2_constant": chain.to_json()["l2_product"],
           "norm_methods": sorted({step.method for step in chain.steps if step.kind in ("Conv2d", "Linear")}),
           "cascade_methods": args.cascade_methods.split(",")}
    with torch.no_grad():
        out["clean_accuracy"] = float((module(x).argmax(1) == y).float().mean())
    # alpha-CROWN at l2 is by far the slowest stage (its column in the table): timed on the baseline only.
    timed = ["lipschitz", "ibp", "crown"] + (["alpha-crown"] if variant == "plain" and args.alpha_limit else [])
    out["stage_seconds_per_sample"] = _stage_times(bounder, x, y, eps_values[0], timed, args)
    per_eps = []
    for eps in eps_values:
        attack = PGD(module, eps, norm="2", steps=args.pgd_steps, restarts=args.pgd_restarts, loss="margin",
                     generator=torch.Generator().manual_seed(args.seed))
        adversarial = attack(x, y)
        with torch.no_grad():
            pgd = float((module(adversarial).argmax(1) == y).float().mean())
        per_eps.append({"eps": eps, "pgd_accuracy": pgd, **_certified(module, bounder, x, y, eps, out, args)})
    out["per_eps"] = per_eps
    return out


def _ball(x: torch.Tensor, eps: float):
    box = ((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    return box, torch.full((x.shape[0],), eps, dtype=torch.float64)


def _stage_times(bounder, x, y, eps: float, methods: list[str], args) -> dict:
    from certify.bounds.bounder import margin_matrix

    times = {}
    for method in methods:
        rows = slice(0, args.alpha_limit if method == "alpha-crown" else args.stage_limit)
        xs, ys = x[rows], y[rows]
        (lower, upper), radii = _ball(xs, eps)
        c = margin_matrix(ys, 10)
        started = time.perf_counter()
        for start in range(0, len(ys), 50):
            part = slice(start, start + 50)
            bounder.lower_bounds(lower[part], upper[part], c[part], method, l2_ball=(xs[part], radii[part]))
        times[method] = (time.perf_counter() - started) / len(ys)
    return times


def _certified(module, bounder, x, y, eps: float, out: dict, args) -> dict:
    from certify.verdicts.cascade import (VERIFIED, CascadeOptions,
                                          certify_batch)

    result = {}
    for label, methods, attack in (("lipschitz", ("lipschitz",), False),
                                   ("cascade", tuple(out["cascade_methods"]), True)):
        options = CascadeOptions(methods=methods, attack=attack, attack_steps=args.pgd_steps,
                                 attack_restarts=2, seed=args.seed)
        if label == "cascade":
            x, y = x[:args.cascade_limit], y[:args.cascade_limit]
        started, verdicts = time.perf_counter(), []
        for start in range(0, len(y), 50):
            part = slice(start, start + 50)
            box, radii = _ball(x[part], eps)
            verdicts += certify_batch(module, bounder, x[part], y[part], box, list(range(start, start + len(y[part]))),
                                      options, l2_radii=radii)
        verified = [v for v in verdicts if v.verdict == VERIFIED]
        result[f"{label}_certified"] = len(verified) / len(y)
        if label == "lipschitz":  # the same stage on the cascade's subset, to compare like with like
            subset = verdicts[:args.cascade_limit]
            result["lipschitz_certified_on_cascade_subset"] = sum(v.verdict == VERIFIED for v in subset) / len(subset)
        result[f"{label}_seconds_per_sample"] = (time.perf_counter() - started) / len(y)
        if label == "cascade":
            result["cascade_verified_by"] = {m: sum(v.method == m for v in verified) for m in methods}
    return result


def markdown(document: dict) -> str:
    eps = document["eps"]
    head = ["model", "L2 product before the last layer", "clean"] + [f"PGD / Lip / casc. @{e:.3g}" for e in eps] + \
        [f"s/sample {m}" for m in ("lipschitz", "ibp", "crown", "alpha-crown")]
    lines = [f"MNIST, {document['train_samples']} training images ({document['epochs']} epoch(s); PGD-l2 training "
             f"{document['pgd_epochs']} epoch(s) of {document['pgd_train_steps']} steps at eps "
             f"{document['paper_eps']:.3f} = 0.05 x mean ||x||_2). Accuracies in % on the first "
             f"{document['test_samples']} test images: PGD-l2 ({document['pgd_steps']} steps, "
             f"{document['pgd_restarts']} restart(s), margin loss) / certified by the Lipschitz stage alone / "
             f"certified by the cascade ({document['cascade_methods']} with PGD) on the first "
             f"{document['cascade_limit']}. Seconds per sample of each bound "
             f"stage alone at the paper's eps, on {document['threads']} CPU cores, over {document['stage_limit']} "
             f"samples (alpha-CROWN: {document['alpha_limit']}, plain models only).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in document["rows"]:
        cells = [f"{row['arch']} {row['variant']}", f"{row['lipschitz_l2_constant']:.3g}",
                 f"{100 * row['clean_accuracy']:.1f}"]
        cells += [f"{100 * r['pgd_accuracy']:.1f} / {100 * r['lipschitz_certified']:.1f} / "
                  f"{100 * r['cascade_certified']:.1f}" for r in row["per_eps"]]
        times = row["stage_seconds_per_sample"]
        cells += [f"{times[m]:.2g}" if m in times else "n/a" for m in ("lipschitz", "ibp", "crown", "alpha-crown")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def show(document: dict) -> None:
    print(markdown(document))
    print(json.dumps({k: v for k, v in document.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
