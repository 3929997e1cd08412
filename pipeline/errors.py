"""The one exception type users see: its message is a single actionable line, printed without a traceback."""


class CoregError(Exception):
    """Bad input or state the user can fix. The CLI prints `error: <message>` and exits with status 2."""
