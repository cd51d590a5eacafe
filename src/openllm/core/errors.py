"""The one exception type that the command line turns into a single error line and exit status 2."""


class OpenLLMError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

    exit_code = 2
