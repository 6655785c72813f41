"""Version patches that let auto_LiRPA 0.3 (the only release on PyPI, from 2022) run on modern
torch and numpy. This is the ONE place where such patches live.

Import auto_LiRPA through `lirpa()` below, never directly: it applies the patches first, and only
those the installed versions need. A newer auto_LiRPA (0.4+, installed from its own repository)
gets none of them and runs untouched.

Each patch says what it is for and when it can go. All of them go once a newer auto_LiRPA is on
PyPI and becomes our minimum version.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import shlex
import sys
import types
import warnings

from packaging.version import Version

from certify.common.errors import UserError

_applied: list[str] = []


def auto_lirpa_version() -> Version:
    try:
        return Version(importlib.metadata.version("auto_LiRPA"))
    except importlib.metadata.PackageNotFoundError:
        import auto_LiRPA  # an uninstalled checkout on sys.path

        return Version(getattr(auto_LiRPA, "__version__", "0"))


def applied_patches() -> list[str]:
    """Names of the patches applied in this process (recorded in certificates)."""
    return list(_applied)


def _patch_numpy_arraysetops() -> None:
    # numpy 2 removed `numpy.lib.arraysetops`; 0.3 only imports `isin` from it.
    import numpy

    try:
        import numpy.lib.arraysetops  # noqa: F401
    except ImportError:
        shim = types.ModuleType("numpy.lib.arraysetops")
        shim.isin = numpy.isin
        sys.modules["numpy.lib.arraysetops"] = shim
        _applied.append("numpy.lib.arraysetops")


def _patch_torch_onnx_helpers() -> None:
    # 0.3 traces models through torch's TorchScript-to-ONNX pass; torch 2.9+ moved its helpers.
    import torch.onnx.symbolic_helper as symbolic_helper
    import torch.onnx.utils as onnx_utils

    if not hasattr(symbolic_helper, "_set_opset_version"):
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        def _set_opset_version(opset_version: int) -> None:
            GLOBALS.export_onnx_opset_version = opset_version

        symbolic_helper._set_opset_version = _set_opset_version
        _applied.append("torch.onnx.symbolic_helper._set_opset_version")
    if not hasattr(onnx_utils, "_optimize_graph"):
        from torch.onnx._internal.torchscript_exporter import utils as ts_utils

        onnx_utils._optimize_graph = ts_utils._optimize_graph
        _applied.append("torch.onnx.utils._optimize_graph")


def _patch_torch_node_getitem() -> None:
    # 0.3 reads node attributes as `node[name]`; torch._C.Node lost __getitem__.
    import torch

    if not hasattr(torch._C.Node, "__getitem__"):

        def _node_getitem(node, key):
            return getattr(node, node.kindOf(key))(key)

        torch._C.Node.__getitem__ = _node_getitem
        _applied.append("torch._C.Node.__getitem__")


def _patch_named_members(auto_LiRPA) -> None:
    # torch >= 2.0 calls `_named_members(..., remove_duplicate=...)` (from .parameters(), and on
    # residual graphs); 0.3's override does not take the keyword. Its behaviour already removes
    # duplicates, so accepting and ignoring the keyword is exact.
    from auto_LiRPA.bound_general import BoundedModule
    from auto_LiRPA.bound_multi_gpu import BoundDataParallel

    for cls in (BoundedModule, BoundDataParallel):
        original = cls._named_members
        if getattr(original, "_harden_patched", False):
            continue

        @functools.wraps(original)
        def _named_members(self, get_members_fn, prefix="", recurse=True,
                           remove_duplicate=True, _original=original):
            return _original(self, get_members_fn, prefix=prefix, recurse=recurse)

        _named_members._harden_patched = True
        cls._named_members = _named_members
    _applied.append("BoundedModule._named_members(remove_duplicate)")


def _patch_relu_full_alpha(auto_LiRPA) -> None:
    # 0.3's BoundRelu.init_opt_parameters: when more than `minimum_sparsity` of a layer's neurons
    # are unstable it builds a FULL alpha, but the reset `self.alpha_indices = None` sits inside
    # `if verbosity > 0:`, so alpha-CROWN later indexes a full alpha with sparse indices and fails
    # with a broadcast error. Re-apply the intended reset after the original initialisation.
    from auto_LiRPA.operators.activation import BoundRelu

    original = BoundRelu.init_opt_parameters
    if getattr(original, "_harden_patched", False):
        return

    @functools.wraps(original)
    def init_opt_parameters(self, start_nodes):
        original(self, start_nodes)
        if self.alpha_indices is None:
            return
        total = self.inputs[0].lower.numel() // self.inputs[0].lower.size(0)
        if self.alpha_indices[0].size(0) > self.options.get("minimum_sparsity", 0.9) * total:
            self.alpha_indices = None

    init_opt_parameters._harden_patched = True
    BoundRelu.init_opt_parameters = init_opt_parameters
    _applied.append("BoundRelu.init_opt_parameters(full-alpha reset)")


def _patch_flat_add_mode(auto_LiRPA) -> None:
    # 0.3 puts every Add and Sub in "patches" mode (meant for convolution outputs) and, when one
    # needs its own bounds, reads a channel axis off its output: on a flat (batch, features) Add,
    # such as GELU's 1 + erf(x / sqrt 2) feeding a product, an IndexError. A flat output has no
    # patches: such a node is in matrix mode.
    from auto_LiRPA.bound_general import BoundedModule
    from auto_LiRPA.operators.bivariate import BoundAdd, BoundSub

    original = BoundedModule.get_sparse_C
    if getattr(original, "_harden_patched", False):
        return

    @functools.wraps(original)
    def get_sparse_C(self, node, *args, **kwargs):
        if isinstance(node, (BoundAdd, BoundSub)) and getattr(node, "mode", None) == "patches" \
                and len(node.output_shape) < 4:
            node.mode = "matrix"
        return original(self, node, *args, **kwargs)

    get_sparse_C._harden_patched = True
    BoundedModule.get_sparse_C = get_sparse_C
    _applied.append("BoundedModule.get_sparse_C(flat Add in matrix mode)")


def bounded_module(module, example, **options):
    """auto_LiRPA's BoundedModule of `module` traced on `example`. An op auto_LiRPA cannot bound is a
    UserError that names it, not auto_LiRPA's bare NotImplementedError after lines of its log. Its
    notes on switching Dropout/BatchNorm modes while tracing are printed to stdout, which is where a
    user's results go: they are dropped."""
    import contextlib
    import io
    import logging


    auto_lirpa = lirpa()
    unsupported: list[str] = []

    class _Collect(logging.Filter):
        def filter(self, record):  # auto_LiRPA logs each op it cannot bound as "Name: onnx::Op, Attr: ..."
            text = record.getMessage()
            if text.startswith("Name: "):
                unsupported.append(text[6:].split(",")[0].replace("onnx::", ""))
            return record.levelno < logging.ERROR

    log, collect = logging.getLogger("auto_LiRPA.utils"), _Collect()
    log.addFilter(collect)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return _max_pool_not_optimised(auto_lirpa.BoundedModule(module, example, **options))
    except NotImplementedError:
        if not unsupported:
            raise
        raise UserError(f"the model uses {', '.join(sorted(set(unsupported)))}, which the bound methods "
                        "(auto_LiRPA) cannot bound", "replace that layer with a supported one (ReLU, "
                        "LeakyReLU, Sigmoid, Tanh, GELU, SiLU, ELU, MaxPool, AvgPool, BatchNorm)") from None
    finally:
        log.removeFilter(collect)


def _max_pool_not_optimised(bounded):
    """`bounded` with max pooling left out of alpha-CROWN's optimisation: it keeps CROWN's own (sound)
    relaxation while the other activations are optimised. auto_LiRPA 0.3's max-pool alpha fails to be
    created on modern torch (a torch.Size inside its size list) and is shared by the whole batch, so
    alpha-CROWN and branch and bound could not run on any net with max pooling."""
    bounded.optimizable_activations = [node for node in bounded.optimizable_activations
                                       if type(node).__name__ != "BoundMaxPool"]
    return bounded


def _register_activations(auto_LiRPA) -> None:
    # 0.3 has no bound for Erf (GELU) or ELU; certify.bounds.activations has sound ones.
    from certify.bounds.activations import bound_classes

    for op, bound_class in bound_classes().items():
        auto_LiRPA.register_custom_op(op, bound_class)
        _applied.append(f"custom op {op}")


# Whether the engine is installed at all: pip cannot install it with the package (certify.setup).
AUTO_LIRPA = "auto-LiRPA==0.3"


def install_command(python: str | None = None) -> list[str]:
    """pip, run by the interpreter that runs harden, installing auto-LiRPA without its stale pins."""
    return [python or sys.executable, "-m", "pip", "install", "--no-deps", AUTO_LIRPA]


def shown(command: list[str]) -> str:
    return shlex.join(command)


def auto_lirpa_installed() -> bool:
    importlib.invalidate_caches()  # a `harden setup` in this process may have just installed it
    return importlib.util.find_spec("auto_LiRPA") is not None


def require_auto_lirpa() -> None:
    """A one-line UserError with the exact command to run when the bound engine is missing."""
    if not auto_lirpa_installed():
        raise UserError("auto_LiRPA, the bound engine, is not installed (pip cannot install it with harden: "
                        "its only release pins torch<1.13)",
                        f"run: {shown(install_command())}   (that is what `harden setup` does)")


@functools.lru_cache(maxsize=None)
def lirpa():
    """Import auto_LiRPA with whatever patches the installed versions need, and return it (a one-line
    UserError naming the install command when it is missing)."""
    require_auto_lirpa()
    old_release = auto_lirpa_version() < Version("0.4")
    if old_release:
        _patch_numpy_arraysetops()
        _patch_torch_onnx_helpers()
        _patch_torch_node_getitem()
    with warnings.catch_warnings():
        # auto_LiRPA scripts a helper with torch.jit.script at import; torch 2.9+ warns that it is
        # deprecated, on stderr, in every run. A filter does not hold: auto_LiRPA calls
        # warnings.simplefilter("once") while it is imported, so the warning is dropped where it
        # is shown (catch_warnings puts back both the filters and showwarning afterwards).
        show = warnings.showwarning

        def _quiet(message, category, *args, **kwargs):
            if not (issubclass(category, DeprecationWarning) and "torch.jit.script" in str(message)):
                show(message, category, *args, **kwargs)

        warnings.showwarning = _quiet
        import auto_LiRPA

    if old_release:
        _patch_named_members(auto_LiRPA)
        _patch_relu_full_alpha(auto_LiRPA)
        _patch_flat_add_mode(auto_LiRPA)
        _register_activations(auto_LiRPA)
    return auto_LiRPA
