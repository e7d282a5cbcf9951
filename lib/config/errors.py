"""ConfigError: a configuration problem, in one line (importable without Kconfig)."""


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming symbol, value and fix."""
