"""The data layer's error type (its own module so that every data module can raise it)."""


class DataError(ValueError):
    """Invalid input data or options; the message names the file:line / option and the fix."""
