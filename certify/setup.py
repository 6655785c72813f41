"""The one dependency pip cannot install with the package: auto_LiRPA, the bound engine.

Its only release on PyPI (0.3, from 2022) pins torch<1.13, for which no current Python has a
build, so declaring it would make `pip install harden` fail to resolve. It is installed without its
pins (`--no-deps`) into the interpreter that runs harden; its real runtime needs are declared in
pyproject.toml, and certify.bounds.compat patches it for modern torch and numpy.

`harden setup` runs that install and then bounds a tiny network to show that the engine works;
every certify run checks for the engine first and names the exact command when it is missing.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Callable

# The install check lives with the compatibility layer, which every import of the engine goes through.
from certify.bounds.compat import AUTO_LIRPA, auto_lirpa_installed, install_command, shown
from certify.common.errors import UserError

# What the Makefile and CI install and test on every run; the compatibility layer was also checked
# by hand on the newest torch that pip offers these machines.
TESTED_TORCH = ("2.13.0", "2.14.1")


def setup(*, run: Callable = subprocess.run, log: Callable[[str], None] = print) -> dict:
    """Install auto-LiRPA into this interpreter when it is missing, then check that it bounds a
    network soundly; returns what was found (versions, patches, whether pip ran)."""
    installed_before = auto_lirpa_installed()
    if not installed_before:
        command = install_command()
        log(f"installing the bound engine: {shown(command)}")
        finished = run(command)
        if finished.returncode != 0:
            raise UserError(f"pip could not install {AUTO_LIRPA} (exit code {finished.returncode}; its output is above)",
                            f"fix what pip says, then run: {shown(command)}")
        if not auto_lirpa_installed():
            raise UserError(f"pip installed {AUTO_LIRPA}, but this Python ({sys.executable}) cannot import it",
                            f"run harden with the interpreter pip installed into, or run: {shown(command)}")
    report = check_bound_engine()
    report["pip_ran"] = not installed_before
    return report


def check_bound_engine() -> dict:
    """Bound a tiny ReLU network by IBP and CROWN through our one bounder and compare the bounds with
    the margins at sampled points of the box: a patch that no longer fits this torch shows up here,
    not in the middle of a certification run."""
    import torch
    from torch import nn

    from certify.bounds.bounder import MarginBounder, empirical_margins
    from certify.bounds.compat import applied_patches, auto_lirpa_version

    generator = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    centre = torch.rand(2, 4, generator=generator)
    labels = torch.tensor([0, 1])
    bounder = MarginBounder(net, (4,))
    points = centre[:, None] + 0.1 * (2 * torch.rand(2, 256, 4, generator=generator) - 1)
    with torch.no_grad():
        sampled = torch.stack([empirical_margins(net(points[i]), labels[i].expand(256)).min(0).values
                               for i in range(2)])
    for method in ("ibp", "crown"):
        lower = bounder.lower_margins(centre - 0.1, centre + 0.1, labels, method)
        if not bool((lower <= sampled + 1e-5).all()):
            raise RuntimeError(f"auto_LiRPA's {method} bound exceeds a sampled margin on a tiny network")
    return {"auto_LiRPA": str(auto_lirpa_version()), "patches": applied_patches(), "torch": torch.__version__,
            "torch_tested": torch.__version__.split("+")[0] in TESTED_TORCH,
            "cuda": torch.cuda.is_available(), "python": sys.executable}
