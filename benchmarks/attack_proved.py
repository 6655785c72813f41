"""Soundness check of a branch-and-bound run: a strong PGD against every sample that
`benchmarks.bab_cnn` reports verified by branch and bound. No sample may be misclassified, and the
smallest margin found (true logit minus the best other, on the file through onnxruntime) must stay
at or above the proved lower bound.

Branch and bound stops as soon as a sample's lower bound is above zero, so its proofs have margins
of 1e-6 to 1e-3: these are the verdicts where a bug in the search would show first.

    python -m benchmarks.attack_proved --report benchmarks/results/bab_cnn_expmtl_w0.1_te0.15_0.1_10k_t60.json \
        --json benchmarks/results/attack_proved_expmtl_w0.1.json --markdown benchmarks/results/attack_proved_expmtl_w0.1.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import finish, markdown_table, table, write_markdown

COLUMNS = ("samples proved by bab", "restarts x steps", "smallest margin found", "smallest found - bound",
           "misclassified", "below bound", "seconds")


def true_margin(logits, labels):
    """Per-sample logit_y - max_{j != y} logit_j: the quantity the verifier lower-bounds."""
    from certify.attacks.gradient import margin

    return -margin(logits, labels)


def smallest_margins(module, x, labels, lower, upper, *, restarts: int, steps: int, seed: int):
    """Per sample, the smallest true margin a sign-gradient descent finds in its box, and where.

    Restart 0 starts at the image, the others uniformly in the box; the step decays linearly from a
    tenth of the box's width, so early steps cross the box and late ones settle into a corner."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    best = torch.full((len(x),), float("inf"))
    best_x = x.clone()
    for i in range(len(x)):
        low, high = lower[i:i + 1].expand(restarts, *x.shape[1:]), upper[i:i + 1].expand(restarts, *x.shape[1:])
        z = low + (high - low) * torch.rand(low.shape, generator=generator)
        z[0] = x[i]
        rows = labels[i:i + 1].expand(restarts)
        for step in range(steps):
            z.requires_grad_(True)
            values = true_margin(module(z), rows)
            (gradient,) = torch.autograd.grad(values.sum(), z)
            with torch.no_grad():
                worst = int(values.argmin())
                if values[worst] < best[i]:
                    best[i], best_x[i] = values[worst], z[worst]
                size = 0.1 * (high - low) * (1 - step / steps)
                z = torch.minimum(torch.maximum(z - size * gradient.sign(), low), high)
    return best, best_x


def check(report: dict, *, restarts: int, steps: int, seed: int) -> dict:
    import numpy as np
    import onnxruntime
    import torch

    from benchmarks.bab_cnn import load_certified

    if report.get("norm", "inf") != "inf":
        raise SystemExit("error: attack_proved checks l-infinity reports only -- pass a bab_cnn report run without "
                         "--norm 2")
    proved = [entry for entry in report["searched"] if entry["verdict"] == "verified" and entry["method"] == "bab"]
    if not proved:
        raise SystemExit("error: the report has no sample verified by branch and bound -- run benchmarks.bab_cnn "
                         "with a --timeout first")
    model, spec, dataset, module, _, _ = load_certified(report["model"], report["limit"])
    module.eval()
    indices = [entry["index"] for entry in proved]
    x = dataset.x[indices].reshape(-1, *model.input_shape).float()
    labels = dataset.y[indices]
    lower, upper = (bound.to(x) for bound in spec.box(x, report["eps"]))
    started = time.perf_counter()
    found, worst_x = smallest_margins(module, x, labels, lower, upper, restarts=restarts, steps=steps, seed=seed)
    # The worst points again on the file itself: the promise is about what onnxruntime computes.
    session = onnxruntime.InferenceSession(report["model"], providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: worst_x.numpy().astype(np.float32)}
    on_file = true_margin(torch.from_numpy(session.run(None, feed)[0]).float(), labels)
    bound = torch.tensor([entry["margin_lower_bound"] for entry in proved])
    smallest = torch.minimum(found, on_file)
    below = smallest < bound
    return {"benchmark": "attack_proved", "report_model": report["model"], "eps": report["eps"],
            "samples": len(proved), "restarts": restarts, "steps": steps, "seed": seed,
            "smallest_margin_found": float(smallest.min()), "smallest_found_minus_bound": float((smallest - bound).min()),
            "misclassified": int((on_file < 0).sum()), "below_bound": int(below.sum()),
            "below_bound_indices": [indices[i] for i in torch.nonzero(below).flatten().tolist()],
            "seconds": round(time.perf_counter() - started, 1), "cores": 2}


def _cells(document: dict) -> list:
    return [document["samples"], f"{document['restarts']} x {document['steps']}",
            f"{document['smallest_margin_found']:.4g}", f"{document['smallest_found_minus_bound']:.4g}",
            document["misclassified"], document["below_bound"], document["seconds"]]


def show(document: dict) -> None:
    from rich.console import Console

    out = table(f"strong PGD against the branch-and-bound proofs on {document['report_model']} at eps "
                f"{document['eps']}", COLUMNS)
    out.add_row(*[str(c) for c in _cells(document)])
    Console().print(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", required=True, help="a benchmarks.bab_cnn JSON")
    parser.add_argument("--restarts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    document = check(json.loads(Path(args.report).read_text()), restarts=args.restarts, steps=args.steps,
                     seed=args.seed)
    lines = [f"{args.report}: PGD with {args.restarts} restarts of {args.steps} steps against each sample branch and "
             "bound proved; margins are the true logit minus the best other, the smaller of torch's and "
             "onnxruntime's at the worst point found; 2 CPU cores.", ""]
    write_markdown(args.markdown, lines + markdown_table(COLUMNS, [_cells(document)]))
    return finish(document, args.json, show)


if __name__ == "__main__":
    main()
