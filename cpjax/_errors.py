"""Errors raised by cpjax."""


class CurvatureError(Exception):
    """An equation cannot be handled by the sweep; the message names it and its source line."""
