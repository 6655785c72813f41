"""The one exception type that the command lines turn into a one-line message.

Anything the user can fix (a bad file, a wrong option, a missing dataset) raises `UserError`;
the CLI prints `error: <what> -- <what to do>` and exits with code 2, without a traceback.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, with a hint on how to fix it."""

    def __init__(self, what: str, hint: str = ""):
        self.what = what
        self.hint = hint
        super().__init__(f"{what} -- {hint}" if hint else what)


def is_finite_number(value) -> bool:
    """A real number as a user or a file gives it: int or float, finite, and not a bool."""
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# auto_LiRPA raises Python's recursion limit to 1e6 on import, so a deeply nested JSON document
# in a crafted file would overflow the C stack inside json's scanner (a segfault, not an error).
MAX_JSON_DEPTH = 200
_JSON_STRING = None


def load_untrusted_json(text: str | bytes, what: str, hint: str = "re-create the file"):
    """json.loads for text read from a user's file: nesting is bounded BEFORE parsing."""
    import json
    import re

    global _JSON_STRING
    if _JSON_STRING is None:
        _JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{what} is not UTF-8 text", hint) from None
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", _JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        raise UserError(f"{what} is JSON nested {deepest} levels deep (at most {MAX_JSON_DEPTH} are read)", hint)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{what} is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})", hint) from None
