"""Package-level names that import their module only when first used, so that importing one
sub-package (the command line's start-up, say) does not import torch-heavy siblings."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_names(package: str, where: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` serving `name -> getattr(import_module(where[name]), name)`."""

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    __getattr__.names = dict(where)  # what the package offers, for listing and tests
    return __getattr__
