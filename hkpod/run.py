"""The one subprocess wrapper: every external command hkpod runs goes through here."""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from hkpod.errors import HkpodError

LOG = logging.getLogger(__name__)

STDERR_TAIL_LINES = 10


class CommandError(HkpodError):
    """A command exited with a status the caller did not allow."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        tail = "\n".join(stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
        message = f"command failed with exit status {returncode}: {shlex.join(argv)}"
        if tail:
            message += f": {tail}"
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


def require_executable(name: str, hint: str) -> str:
    """Return the absolute path of NAME on PATH, or raise with HINT on how to install it."""
    path = shutil.which(name)
    if path is None:
        raise HkpodError(f"{name} not found on PATH", hint)
    return path


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    allowed: Sequence[int] = (0,),
    input: str | None = None,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ARGV and return its result; raise CommandError on a status outside ALLOWED.

    Standard input is /dev/null unless INPUT is given. A missing executable
    becomes a one-line HkpodError, never a traceback.
    """
    LOG.debug("+ %s", shlex.join(argv))
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            text=True,
            env=dict(env) if env is not None else None,
            timeout=timeout,
        )
    except FileNotFoundError as error:
        raise HkpodError(f"{argv[0]} not found", "install it or put it on PATH") from error
    except subprocess.TimeoutExpired as error:
        raise HkpodError(f"command timed out after {timeout:g} s: {shlex.join(argv)}") from error

    if result.returncode != 0:
        LOG.debug("exit status %d: %s", result.returncode, (result.stderr or "").strip()[-500:])
    if check and result.returncode not in allowed:
        raise CommandError(argv, result.returncode, result.stderr or "")
    return result
