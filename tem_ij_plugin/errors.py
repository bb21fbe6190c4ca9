"""Exceptions that mean "the user's input is wrong" rather than "the program is wrong"."""


class UserError(Exception):
    """Bad input or a request that cannot be served; the message is meant for the user.

    Entry points print the message (no traceback) and exit with status 2.
    """


class ModelFileError(UserError):
    """A model file that is truncated, foreign or from a newer format version."""


class Cancelled(Exception):
    """Raised inside long work when the caller's cancel event is set."""
