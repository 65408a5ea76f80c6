"""The meaning of hyperkit's exit statuses and the supervisor's response to each, shared by the supervisor and the driver."""

from __future__ import annotations

import enum
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# hyperkit's exit statuses (src/hyperkit.c: vcpu_loop and the vmexit handlers).
EXIT_POWEROFF = 0
EXIT_ERROR = 1
EXIT_REBOOT = 2
EXIT_TRIPLE_FAULT = 3
EXIT_MEANINGS = {
    EXIT_POWEROFF: "the guest powered off",
    EXIT_ERROR: "hyperkit failed",
    EXIT_REBOOT: "the guest rebooted",
    EXIT_TRIPLE_FAULT: "the guest triple-faulted",
    100: "hyperkit stopped for another reason",
}

# A guest that reboots more often than this is stuck in a loop (such as a panic at boot with panic=1).
RESTART_LIMIT = 3
RESTART_WINDOW = 60.0


class State(enum.Enum):
    """The supervisor's state, as its state file records it."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


FINAL_STATES = (State.STOPPED, State.ERROR)


class Outcome(enum.Enum):
    """The supervisor's next step after hyperkit exits."""

    RESTART = "restart"
    STOPPED = "stopped"
    ERROR = "error"


def describe_exit(status: int) -> str:
    """Say what a hyperkit exit status means; a negative status is the signal that ended it."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"hyperkit was killed by {name}"
    return EXIT_MEANINGS.get(status, "hyperkit stopped for an unknown reason")


def decide(status: int, restarts: Sequence[float], now: float, *, stopping: bool = False) -> Outcome:
    """Return what to do after hyperkit exited with STATUS.

    RESTARTS contains the monotonic times of earlier restarts. A stop request makes
    any exit a stop; status 0 is a poweroff; status 2 is a guest reboot, which
    hyperkit leaves to its launcher, so it is restarted unless that happened
    RESTART_LIMIT times within RESTART_WINDOW seconds already.
    """
    if stopping or status == EXIT_POWEROFF:
        return Outcome.STOPPED
    if status == EXIT_REBOOT:
        recent = [moment for moment in restarts if now - moment < RESTART_WINDOW]
        return Outcome.RESTART if len(recent) < RESTART_LIMIT else Outcome.ERROR
    return Outcome.ERROR


def is_hyperkit_process(argv: Sequence[str] | None, uuid: str) -> bool:
    """True when ARGV is a hyperkit started with -U UUID.

    The program is any word before the first option: a script shows its
    interpreter first, and macOS `ps` splits a path that contains spaces.
    """
    if not argv:
        return False
    program = []
    for word in argv:
        if word.startswith("-"):
            break
        program.append(word)
    if not any("hyperkit" in os.path.basename(word) for word in program):
        return False
    return any(first == "-U" and second.lower() == uuid.lower() for first, second in zip(argv, argv[1:]))


def read_state(path: Path) -> dict[str, Any] | None:
    """Return the supervisor's state record, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, PermissionError):
        return None
    return data if isinstance(data, dict) else None
