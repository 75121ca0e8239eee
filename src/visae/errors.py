"""One exception type for bad input, so the CLI can print it as one line."""


class VisaeError(Exception):
    """A user-facing error: the message names the thing that is wrong."""
