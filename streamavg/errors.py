"""The two ways streamavg refuses work; the CLI turns each into one line on stderr."""


class StreamavgError(Exception):
    """Bad input: a file that is missing, corrupt or does not match the others (exit 1)."""

    exit_code = 1


class UsageError(StreamavgError):
    """Bad arguments: an option out of range or an output that may not be written (exit 2)."""

    exit_code = 2
