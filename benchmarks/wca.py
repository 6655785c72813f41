"""WCA noise (Eustratiadis et al. 2021) against its claim: on MNIST and Fashion-MNIST, the small CNN
trained four ways with the same budget, attacked with PGD and with EOT-PGD.

The four models (all trained from the same initialization, `--epochs` on the first `--train-limit`
training images, Adam 1e-3, batch 128, harden's training loop):

- plain        the small CNN, cross-entropy
- isotropic    the WCA architecture (Linear 100 -> 32, noise, Linear 32 -> 10) with *fixed* isotropic
               Gaussian noise whose trace is the one the WCA model learned; no loss term
- wca          the same architecture with the learned noise N(0, L L^T) and the -log tr(W Sigma W^T) term
- wca+pgd      the same, trained on PGD points (linf eps `--eps-linf`, `--train-steps` steps, one noise
               draw per attack step)

Predictions are random, so every accuracy is a mean over `--clean-draws` noise draws. The attacks:
PGD (one draw per gradient) and EOT-PGD (each gradient averaged over 10, 50 and 100 draws, to show
the attack has converged), linf eps 0.1 and l2 eps 1.5, `--steps` steps with a random start.
Certified accuracy is that of the deterministic mean network (noise off) under certify's cascade
(PGD, then IBP and CROWN; alpha-CROWN left out for time). Finally the stochastic ONNX export is run in
onnxruntime on `--onnx-limit` test images and its accuracy compared with torch's, image by image.

    python -m benchmarks.wca --json benchmarks/results/wca.json --md benchmarks/results/wca.md
    python -m benchmarks.wca --train-limit 2000 --epochs 1 --test-limit 100 --attack-limit 50 \\
        --eot100-limit 20 --cert-limit 20 --onnx-limit 500 --datasets mnist      # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.common import add_run_options, markdown_table, run_datasets
from benchmarks.common import table as new_table

NOISE_DIM = 32
MODELS = ("plain", "isotropic", "wca", "wca+pgd")
STOCHASTIC = MODELS[1:]
EOT_DRAWS = (10, 50, 100)


def make_bundle(module: nn.Module, dataset):
    from harden.io.bundle import Bundle

    return Bundle(module, (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"},
                  data={"dataset": dataset.name, "classes": dataset.classes, "input_range": [0.0, 1.0]})


def with_fixed_isotropic_noise(wca_model: nn.Module, std: float) -> nn.Module:
    """The WCA model's architecture with its head's noise replaced by a frozen N(0, std^2 I), and
    no WCA loss term (a plain WCANoise has no regularizer)."""
    from harden.layers.wca import WCANoise, wca_heads

    model = copy.deepcopy(wca_model)
    name, head = wca_heads(model)[0]
    noise = WCANoise(head.noise.dim, init_std=std)
    noise.free.requires_grad_(False)
    setattr(model, name, nn.Sequential(head.projection, noise, head.classifier))
    return model


def noise_trace(model: nn.Module) -> float:
    from harden.layers.wca import wca_heads

    return float(torch.trace(wca_heads(model)[0][1].covariance().detach()))


def train_models(train, args, quiet: bool) -> tuple[dict, dict, dict]:
    """The four models, their training seconds and what the noise ended as."""
    from harden.io.zoo import small_cnn
    from harden.layers.wca import add_wca
    from harden.training.finetune import FinetuneConfig, finetune

    torch.manual_seed(args.seed)
    initial = small_cnn()
    wca_start = copy.deepcopy(initial)
    add_wca(wca_start, (1, 28, 28), noise_dim=NOISE_DIM, init_std=args.init_std)
    clean = FinetuneConfig(train="clean", epochs=args.epochs, seed=args.seed)
    pgd = FinetuneConfig(train="pgd", eps=args.eps_linf, epochs=args.epochs, steps=args.train_steps, seed=args.seed)
    bundles, seconds = {}, {}

    def fit(name: str, module: nn.Module, config) -> None:
        bundles[name] = make_bundle(module, train)
        began = time.perf_counter()
        finetune(bundles[name], train, None, config, quiet=quiet)
        seconds[name] = round(time.perf_counter() - began, 1)

    fit("plain", copy.deepcopy(initial), clean)
    fit("wca", copy.deepcopy(wca_start), clean)
    trace = noise_trace(bundles["wca"].module)
    fit("isotropic", with_fixed_isotropic_noise(wca_start, math.sqrt(trace / NOISE_DIM)), clean)
    fit("wca+pgd", copy.deepcopy(wca_start), pgd)
    noise = {"wca_trace": trace, "wca+pgd_trace": noise_trace(bundles["wca+pgd"].module),
             "initial_trace": noise_trace(wca_start), "isotropic_std": math.sqrt(trace / NOISE_DIM)}
    return {name: bundles[name] for name in MODELS}, seconds, noise


def mean_accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int, batch: int = 1000) -> float:
    """Accuracy averaged over `draws` noise draws (one forward pass each)."""
    module.eval()
    correct = 0
    with torch.no_grad():
        for _ in range(draws):
            for start in range(0, len(x), batch):
                correct += int((module(x[start:start + batch]).argmax(1) == y[start:start + batch]).sum())
    return correct / (draws * max(len(x), 1))


def attacked_accuracy(module, x, y, *, eps: float, norm: str, steps: int, draws: int | None, clean_draws: int,
                      seed: int, batch: int = 250) -> float:
    """Mean accuracy on PGD points (draws None: one draw per gradient) or EOT-PGD points."""
    from certify.attacks.gradient import EOTPGD, PGD

    generator = torch.Generator().manual_seed(seed)
    options = {"norm": norm, "steps": steps, "random_start": True, "generator": generator}
    attack = PGD(module, eps, **options) if draws is None else EOTPGD(module, eps, draws=draws, **options)
    adversarial = torch.cat([attack(x[s:s + batch], y[s:s + batch]) for s in range(0, len(x), batch)])
    return mean_accuracy(module, adversarial, y, clean_draws)


def certified_accuracy(module, test, *, eps: float, norm: str, seed: int) -> float:
    """Verified fraction for the deterministic mean network (noise off) under PGD, IBP, CROWN."""
    from certify.bounds.bounder import MarginBounder
    from certify.specs.input_spec import InputSpec
    from certify.verdicts.cascade import CascadeOptions, certify_batch
    from harden.layers.wca import noise_disabled

    mean_network = copy.deepcopy(module).eval()
    spec = InputSpec(norm=norm)
    with noise_disabled(mean_network):
        bounder = MarginBounder(mean_network, (1, 28, 28))
        radii = torch.full((len(test),), eps, dtype=torch.float64) if norm == "2" else None
        verdicts = certify_batch(mean_network, bounder, test.x, test.y, spec.box(test.x, eps),
                                 list(range(len(test))), CascadeOptions(methods=("ibp", "crown"), seed=seed),
                                 l2_radii=radii)
    return sum(v.verdict == "verified" for v in verdicts) / max(len(verdicts), 1)


def evaluate(name: str, bundle, test, args) -> dict:
    """Clean accuracy on `--test-limit` images; PGD and EOT-10/50 on the first `--attack-limit`, and
    EOT-100 with PGD again on the first `--eot100-limit` (so each EOT number has its PGD twin)."""
    module = bundle.module.eval()
    draws = args.clean_draws if name in STOCHASTIC else 1
    row = {"clean": mean_accuracy(module, test.x[:args.test_limit], test.y[:args.test_limit], draws)}
    for norm, eps in (("inf", args.eps_linf), ("2", args.eps_l2)):
        tag = f"l{norm}"

        def attacked(limit: int, eot_draws: int | None) -> float:
            return attacked_accuracy(module, test.x[:limit], test.y[:limit], eps=eps, norm=norm, steps=args.steps,
                                     draws=eot_draws, clean_draws=draws, seed=args.seed)

        row[f"pgd_{tag}"] = attacked(args.attack_limit, None)
        if name in STOCHASTIC:
            row[f"eot10_{tag}"], row[f"eot50_{tag}"] = attacked(args.attack_limit, 10), attacked(args.attack_limit, 50)
            row[f"pgd_{tag}_small"], row[f"eot100_{tag}"] = attacked(args.eot100_limit, None), attacked(args.eot100_limit, 100)
        row[f"certified_{tag}"] = certified_accuracy(module, test.subset(args.cert_limit), eps=eps, norm=norm,
                                                     seed=args.seed)
    return row


def correct_counts_torch(module: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> np.ndarray:
    """Per image: in how many of `draws` noise draws the torch model is right."""
    module.eval()
    counts = torch.zeros(len(x))
    with torch.no_grad():
        for _ in range(draws):
            for start in range(0, len(x), 1000):
                counts[start:start + 1000] += (module(x[start:start + 1000]).argmax(1) == y[start:start + 1000]).float()
    return counts.numpy()


def correct_counts_onnx(path: Path, x: torch.Tensor, y: torch.Tensor, draws: int, seed: int) -> np.ndarray:
    import onnxruntime as ort

    ort.set_seed(seed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    counts = np.zeros(len(x))
    images, labels = x.numpy(), y.numpy()
    for _ in range(draws):
        for start in range(0, len(x), 1000):
            logits = session.run(None, {name: images[start:start + 1000]})[0]
            counts[start:start + 1000] += logits.argmax(1) == labels[start:start + 1000]
    return counts


def compare_accuracy_distributions(torch_counts: np.ndarray, onnx_counts: np.ndarray, draws: int) -> dict:
    """Mean accuracy of each and the z-score of their difference. Images are independent and so are
    the draws, so the per-image difference of correct fractions has a standard error std/sqrt(n)."""
    difference = (torch_counts - onnx_counts) / draws
    standard_error = float(difference.std(ddof=1) / math.sqrt(len(difference)))
    mean = float(difference.mean())
    return {"torch_accuracy": float(torch_counts.mean() / draws), "onnx_accuracy": float(onnx_counts.mean() / draws),
            "difference": mean, "standard_error": standard_error,
            "z": mean / standard_error if standard_error > 0 else 0.0}


def onnx_parity(bundle, test, args) -> dict:
    """The stochastic ONNX export in onnxruntime against the torch model, on the same images."""
    from harden.io.export import export_onnx

    x, y = test.x[:args.onnx_limit], test.y[:args.onnx_limit]
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "stochastic.onnx"
        export_onnx(bundle, path, deterministic=False)
        onnx_counts = correct_counts_onnx(path, x, y, args.onnx_draws, args.seed)
    result = compare_accuracy_distributions(correct_counts_torch(bundle.module, x, y, args.onnx_draws),
                                            onnx_counts, args.onnx_draws)
    return {"images": len(x), "draws": args.onnx_draws, **result}


def run_dataset(dataset: str, args, quiet: bool) -> dict:
    from certify.data.datasets import load_dataset

    train = load_dataset(dataset, split="train").subset(args.train_limit)
    test = load_dataset(dataset, split="test")
    bundles, seconds, noise = train_models(train, args, quiet)
    rows = {}
    for name, bundle in bundles.items():
        began = time.perf_counter()
        rows[name] = {**evaluate(name, bundle, test, args), "train_seconds": seconds[name],
                      "eval_seconds": round(time.perf_counter() - began, 1)}
        print(f"{dataset} {name}: {json.dumps(rows[name])}", file=sys.stderr)
    return {"train_samples": len(train), "noise": noise, "measured": rows,
            "onnx_stochastic": onnx_parity(bundles["wca"], test, args)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="fashion-mnist,mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--train-steps", type=int, default=3, help="PGD steps of wca+pgd training")
    parser.add_argument("--init-std", type=float, default=0.1, help="initial WCA noise std (Sigma = std^2 I)")
    parser.add_argument("--eps-linf", type=float, default=0.1)
    parser.add_argument("--eps-l2", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=10, help="steps of every evaluation attack")
    parser.add_argument("--test-limit", type=int, default=1000, help="images for clean accuracy")
    parser.add_argument("--attack-limit", type=int, default=150, help="images for PGD, EOT-10 and EOT-50")
    parser.add_argument("--eot100-limit", type=int, default=40, help="images for EOT-100")
    parser.add_argument("--cert-limit", type=int, default=200, help="images certified")
    parser.add_argument("--clean-draws", type=int, default=10, help="noise draws averaged in every accuracy")
    parser.add_argument("--onnx-limit", type=int, default=10000)
    parser.add_argument("--onnx-draws", type=int, default=5)
    add_run_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return run_datasets(parse(argv), "wca-noise", run_dataset, markdown, show, noise_dim=NOISE_DIM)


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def table_rows(document: dict) -> list[list]:
    rows = []
    for dataset, result in document["results"].items():
        for name, row in result["measured"].items():
            cells = [dataset, name, _percent(row["clean"])]
            for tag in ("linf", "l2"):
                stochastic = row.get(f"eot10_{tag}") is not None
                cells += [_percent(row[f"pgd_{tag}"]),
                          f"{_percent(row[f'eot10_{tag}'])} / {_percent(row[f'eot50_{tag}'])}" if stochastic else "=PGD",
                          f"{_percent(row[f'pgd_{tag}_small'])} / {_percent(row[f'eot100_{tag}'])}" if stochastic else "=PGD",
                          _percent(row[f"certified_{tag}"])]
            cells.append(f"{row['train_seconds']:.0f}")
            rows.append(cells)
    return rows


COLUMNS = ("data", "model", "clean", "PGD linf", "EOT-10 / EOT-50 linf", "PGD / EOT-100 linf (fewer images)",
           "cert. linf", "PGD l2", "EOT-10 / EOT-50 l2", "PGD / EOT-100 l2 (fewer images)", "cert. l2", "train s")


def markdown(document: dict) -> list[str]:
    s = document["settings"]
    first = next(iter(document["results"].values()))
    lines = [f"Small CNN, {s['epochs']} epochs on the first {first['train_samples']} training images (wca+pgd: "
             f"PGD-{s['train_steps']} at linf {s['eps_linf']:g}); attacks: {s['steps']} steps with a random start at "
             f"linf eps {s['eps_linf']:g} and l2 eps {s['eps_l2']:g}. Clean accuracy on {s['test_limit']} test images, "
             f"PGD and EOT-10/50 on the first {s['attack_limit']}, PGD and EOT-100 again on the first "
             f"{s['eot100_limit']}, certified accuracy (the mean network, noise off; PGD + IBP + CROWN) on the "
             f"first {s['cert_limit']}. Accuracies in %, each a mean over {s['clean_draws']} noise draws. "
             f"Training seconds on a shared 2-core CPU machine, {s['threads']} thread(s).", ""]
    lines += markdown_table(COLUMNS, table_rows(document))
    lines += ["", markdown_onnx(document)]
    return lines


def markdown_onnx(document: dict) -> str:
    parts = []
    for dataset, result in document["results"].items():
        o = result["onnx_stochastic"]
        parts.append(f"{dataset}: torch {100 * o['torch_accuracy']:.2f}%, onnxruntime {100 * o['onnx_accuracy']:.2f}% "
                     f"(difference {100 * o['difference']:+.2f} points, z = {o['z']:+.2f}; {o['images']} images x "
                     f"{o['draws']} draws)")
    return "Stochastic ONNX export of the WCA model: " + "; ".join(parts) + "."


def show(document: dict) -> None:
    from rich.console import Console

    out = new_table("WCA noise: mean accuracy over noise draws (%), 2 CPU cores", COLUMNS)
    for row in table_rows(document):
        out.add_row(*row)
    console = Console()
    console.print(out)
    console.print(markdown_onnx(document))
    print(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
