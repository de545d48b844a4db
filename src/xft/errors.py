"""Errors the user can act on: printed as one line by the CLI, never a traceback."""


class UserError(Exception):
    """Bad input or configuration; the message names the file/field/option and what was expected."""
