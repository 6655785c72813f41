"""`--plot out.png`: clean, attacked and certified accuracy against eps, and certified radii.

One figure: the accuracy curves when the run has eps values, a histogram of the per-sample
certified radii when it has --radius, side by side when it has both. Written atomically.
"""

from __future__ import annotations

from pathlib import Path

from certify.verdicts.dataset import CertifyRun
from certify.common.errors import UserError
from certify.common.files import atomic_path

_FORMATS = ("png", "pdf", "svg")
PLOT_SUFFIXES = tuple("." + f for f in _FORMATS)


def check_plot_path(path: str | Path) -> None:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in _FORMATS:
        raise UserError(f"cannot write a plot to {path}", f"give a file ending in {', '.join('.' + f for f in _FORMATS)}")


def plot_run(run: CertifyRun, path: str | Path) -> None:
    check_plot_path(path)
    with atomic_path(path) as tmp:
        draw_plot(run, tmp, Path(path).suffix.lower().lstrip("."))


def draw_plot(run: CertifyRun, target: str | Path, fmt: str) -> None:
    """Draw the figure of `run` into `target` (a file, written directly) in format png/pdf/svg."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    if fmt not in _FORMATS:
        raise UserError(f"cannot write a plot as {fmt!r}", f"give a file ending in {', '.join(PLOT_SUFFIXES)}")
    panels = (1 if run.results else 0) + (1 if run.radius is not None else 0)
    if panels == 0:
        raise UserError("nothing to plot", "give --eps or --radius")
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    name = Path(run.model_path).name
    if run.results:
        ax = axes.pop(0)
        summaries = [r.summary() for r in run.results]
        eps = [s["eps"] for s in summaries]
        for key, label, style in (("clean_accuracy", "clean", "o-"), ("attacked_accuracy", "attacked (PGD)", "s-"),
                                  ("certified_accuracy", "certified", "^-")):
            ax.plot(eps, [100 * s[key] for s in summaries], style, label=label)
        ax.set_xlabel("eps (l-inf, pixel units)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{name}: {summaries[0]['samples']} samples")
        ax.grid(alpha=0.3)
        ax.legend()
    if run.radius is not None:
        ax = axes.pop(0)
        radii = [r.radius for r in run.radius.samples]
        summary = run.radius.summary()
        ax.hist(radii, bins=30, color="tab:green", alpha=0.8)
        ax.axvline(summary["median"], color="black", linestyle="--", label=f"median {summary['median']:.4f}")
        ax.set_xlabel("certified radius (l-inf)")
        ax.set_ylabel("samples")
        ax.set_title(f"certified radii (tolerance {summary['tolerance']:g})")
        ax.legend()
    figure.tight_layout()
    try:
        figure.savefig(target, format=fmt, dpi=120)
    finally:
        plt.close(figure)
