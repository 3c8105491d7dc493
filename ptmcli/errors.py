"""The exception types that the CLI turns into a short message and an exit status instead of a traceback."""


class PtmError(Exception):
    """A problem with the user's input (config, data, paths): the message says what and how to fix it."""

    exit_code = 2


class Interrupted(PtmError):
    """The user stopped a run (Ctrl-C, SIGTERM): the message says what was saved and how to continue.
    Exit status 128 + the signal's number, as a shell reports a process the signal ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
