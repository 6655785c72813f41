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
