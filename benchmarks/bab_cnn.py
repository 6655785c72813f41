"""Branch and bound on a certifiably trained MNIST model: the unknowns the default cascade leaves at
one eps, before and after adding branch and bound with a per-sample timeout, in the same run.

The model is the one `make demo` writes (runs/mnist/model.onnx, IBP-trained); the first `--limit`
test images. Verified accuracy is a lower bound of the robust accuracy, the attacked (PGD) accuracy
an upper bound: branch and bound can only close the gap between them.

    python -m benchmarks.bab_cnn --model runs/mnist/model.onnx --eps 0.1 --limit 1000 --timeout 10 \
        --json benchmarks/results/bab_cnn.json --markdown benchmarks/results/bab_cnn.md

`--resume PREVIOUS.json --timeout 60` searches only the samples that run left unknown, at the longer timeout, and
adds a row to its table: the default cascade over 10k images takes half an hour, and need not be repeated.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import finish, markdown_table, table, write_markdown

COLUMNS = ("run", "samples", "verified", "falsified", "unknown", "verified acc", "attacked acc", "unknown why",
           "seconds")


def _line(name: str, summary: dict, unknowns: list, seconds: float) -> dict:
    reasons: dict[str, int] = {}
    for sample in unknowns:
        if sample.bab is not None:
            reasons[sample.bab["reason"]] = reasons.get(sample.bab["reason"], 0) + 1
    return {"run": name, "samples": summary["samples"], "verified": summary["verified"],
            "falsified": summary["falsified"], "unknown": summary["unknown"],
            "verified_accuracy": summary["certified_accuracy"], "attacked_accuracy": summary["attacked_accuracy"],
            "unknown_reasons": reasons, "seconds": round(seconds, 1)}


def _cells(line: dict) -> list:
    return [line["run"], line["samples"], line["verified"], line["falsified"], line["unknown"],
            f"{100 * line['verified_accuracy']:.2f}%", f"{100 * line['attacked_accuracy']:.2f}%",
            ", ".join(f"{k} {v}" for k, v in line["unknown_reasons"].items()) or "-", line["seconds"]]


def _timeouts(document: dict) -> str:
    """The per-sample timeouts of a run and of the --resume runs after it, "10, 60"."""
    return ", ".join(f"{t:g}" for t in document.get("timeouts", [document["timeout"]]))


def show(document: dict) -> None:
    from rich.console import Console

    out = table(f"branch and bound on {document['model']} at {'l2 radius' if document.get('norm') == '2' else 'eps'} "
                f"{document['eps']} (timeout {_timeouts(document)} s per sample, 2 CPU cores)", COLUMNS)
    for line in document["runs"]:
        out.add_row(*[str(c) for c in _cells(line)])
    Console().print(out)


def load_certified(model_path: str, limit: int):
    """The model file as the cascade certifies it, its input spec and the first `limit` test images
    of the dataset its metadata names: (model, spec, dataset, module, bounder, file_outputs)."""
    import torch

    from certify.data.datasets import load_dataset
    from certify.onnx_import.certifiable import load_certifiable
    from certify.verdicts.dataset import resolve_spec
    from certify.verdicts.file_outputs import certified_module

    model = load_certifiable(model_path)
    spec, dataset_name = resolve_spec(model.metadata, data=None, mean=None, std=None)
    dataset = load_dataset(dataset_name, split="test").subset(limit)
    return (model, spec, dataset, *certified_module(model_path, model, spec, torch.device("cpu")))


def search_unknowns(model_path: str, eps: float, limit: int, unknown: list[int], timeout: float, norm: str = "inf"):
    """The cascade with branch and bound, on the samples the default cascade left unknown."""
    import torch

    from certify.bounds.bounder import METHODS
    from certify.verdicts.cascade import CascadeOptions, certify_batch

    model, spec, dataset, module, bounder, file_outputs = load_certified(model_path, limit)
    options = CascadeOptions(methods=METHODS + ("bab",), timeout=timeout)
    verdicts = []
    for index in unknown:
        x = dataset.x[index:index + 1].reshape(-1, *model.input_shape)
        # At l2 the box is the ball's bounding box within the input range, as certify --norm 2 has it.
        radii = torch.full((1,), eps, dtype=torch.float64) if norm == "2" else None
        verdicts += certify_batch(module, bounder, x, dataset.y[index:index + 1], spec.box(x, eps), [index], options,
                                  file_outputs=file_outputs, l2_radii=radii)
    return verdicts


def after_search(summary: dict, searched: list) -> dict:
    """The summary once the searched samples' new verdicts replace their unknowns."""
    summary = dict(summary)
    for v in searched:
        summary["unknown"] -= v.verdict != "unknown"
        summary["verified"] += v.verdict == "verified"
        summary["falsified"] += v.verdict == "falsified"
        summary["certified_accuracy"] += (v.verdict == "verified") / summary["samples"]
        summary["attacked_accuracy"] -= (v.verdict == "falsified") / summary["samples"]
    return summary


def _summary(line: dict) -> dict:
    keys = ("samples", "verified", "falsified", "unknown")
    return {**{k: line[k] for k in keys}, "certified_accuracy": line["verified_accuracy"],
            "attacked_accuracy": line["attacked_accuracy"]}


def _resume(args, previous_path: str) -> dict:
    """Search the samples a previous run of this benchmark left unknown, at this run's timeout."""
    import json
    from pathlib import Path

    try:
        previous = json.loads(Path(previous_path).read_text())
        previous["searched"], previous["runs"][-1]  # the parts read below: a KeyError here is a wrong file
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise SystemExit(f"error: --resume {previous_path} is not a benchmarks.bab_cnn JSON ({error}) -- pass the "
                         "--json an earlier run of this benchmark wrote") from None
    for key in ("model", "eps", "norm", "limit"):
        if previous.get(key) != getattr(args, key):
            raise SystemExit(f"error: --resume {previous_path} was run with {key} {previous.get(key)!r}, not "
                             f"{getattr(args, key)!r} -- pass the same --model, --eps, --norm and --limit")
    left = [entry["index"] for entry in previous["searched"] if entry["verdict"] == "unknown"]
    started = time.perf_counter()
    searched = search_unknowns(args.model, args.eps, args.limit, left, args.timeout, args.norm)
    summary = after_search(_summary(previous["runs"][-1]), searched)
    line = _line(f"then bab {args.timeout:g} s on the {len(left)} left", summary,
                 [v for v in searched if v.verdict == "unknown"], time.perf_counter() - started)
    by_index = {entry["index"]: entry for entry in previous["searched"]}
    by_index.update({v.index: v.to_json() for v in searched})
    return {**previous, "runs": previous["runs"] + [line], "timeouts": previous.get("timeouts", [previous["timeout"]])
            + [args.timeout], "searched": [by_index[i] for i in sorted(by_index)]}


def _fresh(args) -> dict:
    """The default cascade on the first --limit test images, then branch and bound on its unknowns."""
    from certify.bounds.bounder import METHODS
    from certify.verdicts.dataset import certify_model

    started = time.perf_counter()
    run = certify_model(args.model, [args.eps], limit=args.limit, methods=METHODS, quiet=True, norm=args.norm)
    default = run.results[0]
    line = _line("default cascade", default.summary(), [v for v in default.samples if v.verdict == "unknown"],
                 time.perf_counter() - started)
    started = time.perf_counter()
    unknown = [v.index for v in default.samples if v.verdict == "unknown"]
    searched = search_unknowns(args.model, args.eps, args.limit, unknown, args.timeout, args.norm)
    after = _line("then bab on the unknowns", after_search(default.summary(), searched),
                  [v for v in searched if v.verdict == "unknown"], time.perf_counter() - started)
    return {"benchmark": "bab_cnn", "model": args.model, "eps": args.eps, "norm": args.norm, "limit": args.limit,
            "timeout": args.timeout, "cores": 2, "runs": [line, after], "searched": [v.to_json() for v in searched]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/mnist/model.onnx")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds of branch and bound per sample")
    parser.add_argument("--norm", choices=("inf", "2"), default="inf", help="l-infinity boxes or l2 balls of radius eps")
    parser.add_argument("--resume", default=None, metavar="PREVIOUS.json",
                        help="search only the samples that run left unknown, and add a row to its table")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    document = _resume(args, args.resume) if args.resume else _fresh(args)
    ball = "l2 radius" if args.norm == "2" else "l-infinity eps"
    searches = (f"with branch and bound at each timeout in turn ({_timeouts(document)} s per sample) on the samples "
                "the row above left unknown" if args.resume else
                f"with at most {args.timeout:g} s of branch and bound per sample on the samples it left unknown")
    caption = (f"{args.model}, first {args.limit} MNIST test images, {ball} {args.eps:g}: the default cascade, then the "
               f"cascade {searches} (seconds: that search alone, the cascade rerun on each sample included); "
               "2 CPU cores.")
    write_markdown(args.markdown, [caption, ""] + markdown_table(COLUMNS, [_cells(e) for e in document["runs"]]))
    return finish(document, args.json, show)


if __name__ == "__main__":
    main()
