"""The toolkit's two kinds of failure a user should see as one clear line, not a traceback."""


class ConfigError(ValueError):
    """An invalid configuration value, combination or input file; the message names the field (or
    file and line) and the valid choices."""


class WorkerError(RuntimeError):
    """A launched rank raised or died; the message names the rank and the cause.

    `rank` (None when no single rank is to blame), `cause` (one line: the exception's last line)
    and `traceback` (the rank's full traceback, '' when it died without one) let a caller print
    one line and keep the rest in a log file."""

    def __init__(self, message: str, rank: int | None = None, cause: str = "", traceback: str = ""):
        super().__init__(message)
        self.rank, self.cause, self.traceback = rank, cause or message.splitlines()[0], traceback
