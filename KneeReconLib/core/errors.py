"""User-facing errors: a clear message and exit code 2 on the command line."""


class KneeReconError(Exception):
    """A problem with the user's input (file, option, model) rather than a bug."""

    exit_code = 2
