"""One exception type for bad input, so the CLI can print it as one line."""


class VisaeError(Exception):
    """A user-facing error: the message names the thing that is wrong."""


def first_line(exc: BaseException) -> str:
    """A library exception's message cut to its first line (hub clients write paragraphs), or
    its type when it has none: what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
