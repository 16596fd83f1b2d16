import os


class PipelineError(Exception):
    """A problem with the user's input or environment. The CLI prints the message (no traceback) and exits 2."""


def first_line(e: BaseException) -> str:
    """The first line of a library exception's message (or its type), for one-paragraph error messages."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_OFFLINE_SIGNS = ("OfflineModeIsEnabled", "couldn't connect", "Couldn't reach", "ConnectionError", "ConnectTimeout",
                  "Max retries exceeded", "Name or service not known", "Temporary failure in name resolution",
                  "Network is unreachable", "LocalEntryNotFoundError")


def offline_reason(e: BaseException) -> str | None:
    """Why the Hugging Face Hub could not be used, if the failure is about being offline; None otherwise."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE=1 is set (offline mode)"
    chain, seen = [], e
    while seen is not None and len(chain) < 10:
        chain.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = " ".join(chain)
    if any(sign in text for sign in _OFFLINE_SIGNS):
        return "the Hugging Face Hub cannot be reached from this machine (offline)"
    return None
