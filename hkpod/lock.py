"""A per-machine lock so that two hkpod processes never act on one machine at once."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hkpod.errors import HkpodError


@contextmanager
def machine_lock(path: Path, name: str) -> Iterator[None]:
    """Hold an exclusive flock on PATH, or fail at once naming the process that holds it."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            raise HkpodError(
                f"machine {name!r} is busy: another hkpod command (pid {holder}) is acting on it",
                "wait for it to finish and try again",
            ) from error
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)
