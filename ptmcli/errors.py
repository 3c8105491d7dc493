"""The one exception type that the CLI turns into a short message and exit status 2."""


class PtmError(Exception):
    """A problem with the user's input (config, data, paths): the message says what and how to fix it."""

    exit_code = 2
