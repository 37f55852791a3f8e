"""The one exception type of validation."""


class ConfigError(ValueError):
    """A bad config value or input; the message is one line for the user."""
