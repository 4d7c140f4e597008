"""The error a bad config file or override raises."""

from __future__ import annotations

from utils.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid; the message names key and source."""
