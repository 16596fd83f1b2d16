class PipelineError(Exception):
    """A problem with the user's input or environment. The CLI prints the message (no traceback) and exits 2."""
