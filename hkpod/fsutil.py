"""Small file-system and socket helpers shared by several modules."""

from __future__ import annotations

import os
import socket
from pathlib import Path

# sun_path has room for 104 bytes on macOS and 108 on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 100


def fsync_directory(directory: Path) -> None:
    """Make a rename in DIRECTORY survive a crash of the host."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def connect_unix(connection: socket.socket, path: Path) -> None:
    """Connect CONNECTION to the unix socket PATH, by a relative name when the absolute one is too long."""
    if len(os.fsencode(path)) < MAX_SOCKET_PATH:
        connection.connect(str(path))
        return
    previous = os.getcwd()
    os.chdir(path.parent)
    try:
        connection.connect(path.name)
    finally:
        os.chdir(previous)
