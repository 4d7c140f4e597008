"""The mark of an error caused by what the user gave (a config, a path, a file), not by the code."""

from __future__ import annotations


class UserError(Exception):
    """An error whose message tells the user what to change: the training scripts print its one line and exit 2,
    without a traceback (``--debug`` shows it). Error classes of every package derive from it beside their
    built-in base (``class ConfigError(UserError, ValueError)``), so the scripts need not know them."""
