"""The one error type of the experiment layer that the entry points answer without a traceback."""


class ConfigError(ValueError):
    """A user error in the configuration (bad value, unknown key, incompatible choice)."""
