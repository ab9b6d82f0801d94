"""Errors that mean "the user's input is wrong", as opposed to a bug in GeoToken.

The CLI prints these as one line (no traceback) and exits with status 2.
`GeoTokenError` subclasses ValueError so library callers can catch either.
"""


class GeoTokenError(ValueError):
    """Bad input: a file, row, field or option that cannot be used. The message names it."""
