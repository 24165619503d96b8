"""The user-facing errors: printed as `error: MESSAGE` with exit code 2, no traceback."""


class ConfigError(ValueError):
    """A user's mistake in a config file or an override; printed without traceback."""


class DataError(ConfigError):
    """A user's mistake in the data a config names (a corpus path that matches no file,
    a file that is not text, a tokenizer file that is not a tokenizer, a shard cache
    that does not match its index). The message starts with the config key and names
    the file; the CLI treats it as a config error."""
