"""The toolkit's two kinds of failure a user should see as one clear line, not a traceback."""


class ConfigError(ValueError):
    """An invalid configuration value, combination or input file; the message names the field (or
    file and line) and the valid choices."""


class WorkerError(RuntimeError):
    """A launched rank raised or died; the message names the rank and the cause."""
