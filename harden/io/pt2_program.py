"""The checks on a .pt2 archive's program document (models/model.json) and on the graph torch
builds from it: plain names only, symbolic expressions from a small grammar, aten ops without the
file ops. Why each check exists is in harden.io.pt2's docstring."""

from __future__ import annotations

import keyword
import math
import re
from typing import Any

import torch

from certify.common.errors import UserError, load_untrusted_json

_MODEL_JSON = "models/model.json"

# Every string and key of the program JSON that is not a symbolic expression or a tree spec: names
# of nodes, tensors, parameters, ops, devices. No quotes, backslashes, spaces or line breaks, so
# nothing can leave the string literal torch.fx writes it into.
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]{0,200}")
_TORCH_VERSION = re.compile(r"[A-Za-z0-9_.+\-]{0,64}")
_ATEN_OP = re.compile(r"torch\.ops\.aten\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
# aten ops that reach outside the model: aten::save writes any file, from_file reads one.
_FILE_OPS = frozenset({"save", "from_file", "_print"})
_SYM_OPS = frozenset({
    "_operator.getitem", "_operator.eq", "_operator.ne", "_operator.le", "_operator.ge", "_operator.lt",
    "_operator.gt", "_operator.neg", "_operator.pos", "_operator.mul", "_operator.add", "_operator.sub",
    "_operator.floordiv", "_operator.mod", "_operator.truediv", "_operator.and_", "_operator.or_",
    "math.trunc", "torch.sym_not", "torch.sym_int", "torch.sym_float", "torch.sym_ite", "torch.sym_max",
    "torch.sym_min", "torch.sym_sqrt",
})
# Argument and spec kinds that carry code or Python objects: higher-order-op subgraphs, operators
# passed as values, TorchScript objects.
_REFUSED_KEYS = frozenset({"as_graph", "as_operator", "as_custom_obj", "custom_obj"})

# Symbolic expressions are written with sympy's srepr: Symbol('s0', positive=True, integer=True),
# Add(Integer(1), Symbol(...)), FloorDiv(...). sympify evaluates them as Python, so only these names
# (no powers or shifts: a tiny string could ask for a number with 10**18 digits), plain numbers,
# quoted plain names and ( ) , = - are let through.
_SYM_NAMES = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
    "And", "Or", "Not", "true", "false", "True", "False", "BooleanTrue", "BooleanFalse", "Infinity",
    "NegativeInfinity", "oo", "zoo", "nan", "One", "Zero", "NegativeOne", "Half",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "IntTrueDiv", "FloatTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    # assumption keywords of Symbol(...), and Float's precision
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "zero",
    "nonzero", "rational", "commutative", "extended_real", "even", "odd", "precision",
})
_SYM_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<number>\d{1,30}(?:\.\d{1,30})?(?:[eE][+-]?\d{1,3})?)"
                        r"|(?P<string>'[A-Za-z0-9_.+\-]{0,64}')|(?P<op>[(),=\-]))")
_MAX_DEPTH = 64


class _Refused(Exception):
    """The archive holds something this reader does not read safely; the message says what."""


class _NotPt2(UserError):
    def __init__(self, detail: str):
        super().__init__(f"is not a torch.export archive harden can read ({detail})",
                         "re-export it with torch.export.save, or export to ONNX")



def _json(raw: bytes, name: str) -> Any:
    try:
        return load_untrusted_json(raw, name)
    except UserError as exc:
        raise _NotPt2(exc.what) from None


# -- the program document ----------------------------------------------------------------------------

def _checked_program(raw: bytes) -> dict:
    document = _json(raw, _MODEL_JSON)
    if not isinstance(document, dict) or not isinstance(document.get("graph_module"), dict):
        raise _NotPt2("models/model.json is not an exported program")
    graph_module = document["graph_module"]
    # Free text that only serves debugging (stack traces, module paths, user annotations) and the
    # guards (Python source that module() would exec; they only re-check the input shapes): dropped.
    document["guards_code"] = []
    graph_module["metadata"] = {}
    graph = graph_module.get("graph")
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    if not isinstance(nodes, list):
        raise _NotPt2("models/model.json has no graph")
    for node in nodes:
        if isinstance(node, dict):
            node["metadata"] = {}
    signatures = graph_module.get("module_call_graph")
    for entry in signatures if isinstance(signatures, list) else []:
        signature = entry.get("signature") if isinstance(entry, dict) else None
        if isinstance(signature, dict):
            for name in signature.get("forward_arg_names") or []:
                if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
                    raise _Refused(f"names a forward argument {str(name)[:60]!r} (not a Python identifier)")
    _check_strings(document, 0)
    return document


def _check_strings(value: Any, depth: int, key: str | None = None) -> None:
    if depth > _MAX_DEPTH:
        raise _NotPt2("models/model.json is nested too deeply")
    if isinstance(value, dict):
        for name, item in value.items():
            if name in _REFUSED_KEYS:
                raise _Refused(f"uses a {name} value (a subgraph, an operator or a TorchScript object)")
            if not _PLAIN.fullmatch(name):
                raise _Refused(f"holds the key {name[:60]!r} (not a plain name: torch.fx pastes names into Python source)")
            _check_strings(item, depth + 1, name)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, depth + 1, key)
    elif isinstance(value, str):
        if key == "expr_str":
            _check_sym_expr(value)
        elif key in ("in_spec", "out_spec"):
            _check_treespec(value)
        elif key == "torch_version":
            if not _TORCH_VERSION.fullmatch(value):
                raise _Refused(f"records the torch version {value[:60]!r}")
        elif key == "target":
            if not (_ATEN_OP.fullmatch(value) or value in _SYM_OPS):
                raise _Refused(f"calls {value[:80]!r} (not an aten op)")
            if _ATEN_OP.fullmatch(value) and value.split(".")[3] in _FILE_OPS:
                raise _Refused(f"calls {value} (it reads or writes files)")
        elif not _PLAIN.fullmatch(value):
            raise _Refused(f"holds the name {value[:60]!r} (not a plain name: torch.fx pastes names into Python source)")
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise _NotPt2("models/model.json holds a value of an unexpected type")


def _check_sym_expr(text: str) -> None:
    if len(text) > 2000:
        raise _Refused("holds a symbolic shape expression of more than 2000 characters")
    position = 0
    while position < len(text):
        match = _SYM_TOKEN.match(text, position)
        if match is None or match.end() == position:
            if text[position:].strip() == "":
                return
            raise _Refused(f"holds the symbolic shape expression {text[:80]!r} (sympy evaluates it as Python)")
        if match.group("name") and match.group("name") not in _SYM_NAMES:
            raise _Refused(f"holds the symbolic shape expression {text[:80]!r} (sympy evaluates it as Python)")
        position = match.end()


def _check_treespec(text: str) -> None:
    try:
        protocol, spec = load_untrusted_json(text, "a tree spec")
    except (UserError, ValueError, TypeError):
        raise _NotPt2("a tree spec in models/model.json is damaged") from None
    if type(protocol) is not int:
        raise _NotPt2("a tree spec in models/model.json is damaged")
    _check_spec_node(spec, 0)


def _check_spec_node(spec: Any, depth: int) -> None:
    if depth > _MAX_DEPTH or not isinstance(spec, dict):
        raise _NotPt2("a tree spec in models/model.json is damaged")
    kind, context, children = spec.get("type"), spec.get("context"), spec.get("children_spec")
    if kind is not None and not (isinstance(kind, str) and _PLAIN.fullmatch(kind)):
        raise _Refused(f"holds the tree spec type {str(kind)[:60]!r}")
    if context is not None:
        # a JSON document itself: the keys of a dict input, or null
        try:
            decoded = load_untrusted_json(context, "a tree spec context") if isinstance(context, str) else None
        except UserError:
            decoded = None
        if not isinstance(context, str) or not _plain_json(decoded, 0):
            raise _Refused("holds a tree spec context that is not made of plain names")
    if not isinstance(children, list):
        raise _NotPt2("a tree spec in models/model.json is damaged")
    for child in children:
        _check_spec_node(child, depth + 1)


def _plain_json(value: Any, depth: int) -> bool:
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, list):
        return all(_plain_json(item, depth + 1) for item in value)
    if isinstance(value, str):
        return bool(_PLAIN.fullmatch(value))
    return value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value))


def _check_graph(graph) -> None:
    """What came out must be a straight-line graph of aten ops (defence in depth: the document
    check above already allowed nothing else)."""
    import operator

    from torch._export.serde.serialize import _SYM_OPS as SYM_CALLABLES

    allowed = set(SYM_CALLABLES) | {operator.getitem}
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            raise _Refused(f"has a graph node of kind {node.op}")
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten" \
                and target._schema.name.split("::")[1] not in _FILE_OPS:
            continue
        if target in allowed:
            continue
        raise _Refused(f"calls {str(target)[:80]!r} (not an aten op)")
