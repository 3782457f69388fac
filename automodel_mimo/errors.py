"""Errors the CLI prints as one line, without a traceback: what the user can fix, and what stopped a run."""


class UserInputError(ValueError):
    """A problem in the user's config or data; the message names the key and the fix. Exit code 2."""


class RunStopped(RuntimeError):
    """The run stopped itself on purpose (e.g. too many non-finite steps in a row); the message names the step
    and what to try. Raised on every rank alike (the decision is a world consensus). Exit code 3."""
