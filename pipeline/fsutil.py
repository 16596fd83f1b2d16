"""Filesystem guards: writable output folders and an exclusive lock that dies with its holder."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import time

from .errors import PipelineError

try:
    import fcntl
except ImportError:  # Windows: no flock; precompute runs unlocked there
    fcntl = None


def read_json(path: str, what: str):
    """A JSON file the user named (a config, a search space, a grid); unreadable or invalid: a clear error."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"cannot read {what} {path!r}: {e}") from None


def ensure_writable_dir(path: str, what: str, option: str) -> None:
    """Create `path` if needed and prove a file can be written there; else a clear error naming the option."""
    try:
        os.makedirs(path or ".", exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path or ".", prefix=".write-test-"):
            pass
    except OSError as e:
        raise PipelineError(
            f"{what} {path!r} is not writable ({e.strerror or e}); choose a writable folder with {option}."
        ) from None


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def exclusive_lock(lock_path: str, what: str, timeout: float | None = None):
    """Hold an exclusive flock on `lock_path` while the block runs. The kernel drops it when the holder exits in any
    way (SIGKILL included), so a crashed holder never blocks anyone; the file itself only names the holder and is
    removed on release (a SIGKILLed holder leaves it behind, harmless: the next holder takes it over).
    timeout=None waits as long as it takes, 0 fails at once; waiting is announced with the holder's pid."""
    if fcntl is None:
        yield
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    announced = False
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise PipelineError(f"cannot lock {lock_path} ({e.strerror}).") from None
            holder = _read_holder(lock_path)
            if deadline is not None and time.monotonic() >= deadline:
                raise PipelineError(
                    f"another process ({holder}) is writing {what} (it holds {lock_path}). Wait for it to finish "
                    f"and rerun (then this is a no-op), or raise --lock-timeout to wait."
                )
            if not announced:
                print(f"waiting for another process ({holder}) that is writing {what} ...", flush=True)
                announced = True
            time.sleep(0.2)
            continue
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # the previous holder removed the file while we waited on it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # still holding the lock: a waiter sees the file is gone and retries
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(lock_path: str) -> str:
    try:
        with open(lock_path) as fh:
            h = json.loads(fh.read() or "{}")
        return f"pid {h['pid']} on {h['host']} since {h['since']}"
    except (OSError, ValueError, KeyError):
        return "unknown pid"
