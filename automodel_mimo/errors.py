"""Errors a user can cause and fix; the CLI prints them as one line, without a traceback."""


class UserInputError(ValueError):
    """A problem in the user's config or data; the message names the key and the fix."""
