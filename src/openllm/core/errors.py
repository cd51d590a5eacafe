"""The one exception type that the command line turns into a single error line and exit status 2."""


class OpenLLMError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

    exit_code = 2


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (``default``, else the exception's type name, when it has none):
    another library's error, told in one line."""
    return (str(exc).strip().splitlines() or [default or type(exc).__name__])[0]
