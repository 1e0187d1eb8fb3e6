"""Errors that are the user's to fix: the CLI prints them as one line (exit 2)."""


class UserError(ValueError):
    """A bad value from the user: names it and says what would work."""
