import os


class PipelineError(Exception):
    """A problem with the user's input or environment. The CLI prints the message (no traceback) and exits 2."""


def first_line(e: BaseException) -> str:
    """The first line of a library exception's message (or its type), for one-paragraph error messages."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _offline_types() -> tuple:
    """Exception types that mean "the Hub could not be reached": huggingface_hub's own, the HTTP client's, and the
    built-in ConnectionError that datasets raises ("Couldn't reach ...")."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    types = (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)
    for module, names in (("requests.exceptions", ("ConnectionError", "Timeout")),
                          ("httpx", ("ConnectError", "TimeoutException", "NetworkError"))):
        try:
            mod = __import__(module, fromlist=list(names))
            types += tuple(getattr(mod, n) for n in names)
        except ImportError:
            pass
    return types


def offline_reason(e: BaseException) -> str | None:
    """Why the Hugging Face Hub could not be used, if the failure is about being offline; None otherwise."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE=1 is set (offline mode)"
    types, seen, depth = _offline_types(), e, 0
    while seen is not None and depth < 10:  # the error, what caused it, what that was raised in, ...
        if isinstance(seen, types):
            return "the Hugging Face Hub cannot be reached from this machine (offline)"
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    return None
