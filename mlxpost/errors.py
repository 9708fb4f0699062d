"""Errors that mean "the input is wrong": the CLI prints the message and exits 2."""


class UserError(Exception):
    """Bad input named precisely (file, line, column or option); no traceback is shown."""
