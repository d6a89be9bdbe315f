"""Crash-safe file writing, shared by run folders, checkpoints and caches."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


_writes = 0


def _crash_now(fault_point: str | None) -> bool:
    """CNNLAB_FAULT=checkpoint-write:K kills the process (SIGKILL) during its K-th checkpoint write.

    Used by the reliability tests to prove that a crash mid-write never corrupts a run."""
    global _writes
    spec = os.environ.get("CNNLAB_FAULT", "")
    if fault_point is None or not spec.startswith(fault_point + ":"):
        return False
    _writes += 1
    return _writes == int(spec.split(":")[1])


def atomic_write_bytes(path: Path, data: bytes, fault_point: str | None = None) -> None:
    """Write `data` to `path` so that `path` is always either the old or the complete new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if _crash_now(fault_point):  # fault injection (tests): die half-way through this write
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), 9)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power cut
        finally:
            os.close(fd)
    except OSError as e:  # disk full, read-only, …: say which file (a write error alone names none)
        with contextlib.suppress(OSError):
            tmp.unlink()  # never leave a partial file behind
        if e.filename is None or Path(e.filename) == tmp:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)  # Ctrl-C…: the same
        raise


@contextlib.contextmanager
def replacing(path: Path, suffix: str = ".tmp"):
    """A temporary name beside `path` (unique to this process and call) to write to; on success it replaces
    `path` in one rename, on any error it is removed. For writers that want a file name (matplotlib, csv):
    two processes writing the same file never share a temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
