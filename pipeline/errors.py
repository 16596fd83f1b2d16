class PipelineError(Exception):
    """A problem with the user's input or environment. The CLI prints the message (no traceback) and exits 2."""


def first_line(e: BaseException) -> str:
    """The first line of a library exception's message (or its type), for one-paragraph error messages."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
