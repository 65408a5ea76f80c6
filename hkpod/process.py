"""Facts about host processes: whether a pid is alive and what its command line is."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hkpod.run import run


def read_pid_file(path: Path) -> int | None:
    """Return the pid in PATH, or None when the file is missing or does not hold a pid."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def command_line(pid: int) -> list[str] | None:
    """Return the argv of PID, or None when no such live process exists (zombies count as gone)."""
    if sys.platform.startswith("linux"):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        if not raw:
            return None
        return raw.rstrip(b"\0").decode(errors="replace").split("\0")
    result = run(["ps", "-ww", "-o", "command=", "-p", str(pid)], check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    # NOTE: ps joins argv with spaces, so an argument containing a space is split here.
    return result.stdout.strip().split(" ")


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
