"""Find a usable hyperkit binary, and tell the user where one comes from when none is found."""

from __future__ import annotations

import enum
import logging
import os
import platform
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hkpod.errors import HkpodError
from hkpod.run import run

LOG = logging.getLogger(__name__)

HYPERKIT_ENV = "HKPOD_HYPERKIT"

# Linux 4.17 and newer turn paging off for a moment in long mode, which older
# hyperkit cannot emulate: the fix (commit d4bac08) and -M both arrived in v0.20190201.
MIN_VERSION_DATE = 20190201

VERSION_TIMEOUT_SECONDS = 10

# Relative to the filesystem root, so tests can lay out a fake root.
DOCKER_DESKTOP_PATHS = (
    "Applications/Docker.app/Contents/Resources/bin/com.docker.hyperkit",
    "Applications/Docker.app/Contents/Resources/bin/hyperkit",
    "Applications/Docker.app/Contents/MacOS/com.docker.hyperkit",
)
MULTIPASS_PATHS = ("Library/Application Support/com.canonical.multipass/bin/hyperkit",)

WHERE_TO_GET = (
    "hyperkit comes with Docker Desktop for Intel Macs (the versions that still bundle it)"
    " and with Multipass before 1.13, or build it from source (github.com/moby/hyperkit);"
    " Homebrew no longer ships it. Pass its path with --hyperkit PATH"
)

# `hyperkit -v` prints "PROGRAM: VERSION" on stderr, where VERSION is a git
# describe of a tag ("v0.20200224-44-gb54460") or a bare tag ("0.20210107").
_VERSION_LINE = re.compile(r"^[^:\n]*:[ \t]*(v?\d+\.(\d{8})(?!\d)\S*)", re.MULTILINE)


class Source(enum.Enum):
    """The origin of a hyperkit candidate, in search order."""

    OPTION = "the --hyperkit option"
    ENV = f"${HYPERKIT_ENV}"
    PATH = "PATH"
    DOCKER_DESKTOP = "Docker Desktop"
    MULTIPASS = "Multipass"


@dataclass(frozen=True)
class Candidate:
    """A path where hyperkit may be. A candidate the user named must work; others may be skipped."""

    path: Path
    source: Source

    @property
    def named_by_user(self) -> bool:
        return self.source in (Source.OPTION, Source.ENV)


@dataclass(frozen=True, order=True)
class HyperkitVersion:
    """A hyperkit version, compared by the date of its release tag (v0.YYYYMMDD)."""

    date: int
    text: str = field(compare=False)


@dataclass(frozen=True)
class HyperkitBinary:
    """A hyperkit that runs. VERSION is None when its -v output names no release."""

    path: Path
    source: Source
    version: HyperkitVersion | None


class _Unusable(Exception):
    """The reason a candidate cannot be used."""


def parse_version(output: str) -> HyperkitVersion | None:
    """Parse the output of `hyperkit -v`; return None when it names no release date."""
    match = _VERSION_LINE.search(output)
    if match is None:
        return None
    return HyperkitVersion(date=int(match.group(2)), text=match.group(1))


def hyperkit_candidates(
    explicit: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    root: Path = Path("/"),
) -> list[Candidate]:
    """List where to look for hyperkit, first choice first.

    The order: EXPLICIT (the --hyperkit option), $HKPOD_HYPERKIT, `hyperkit` on
    PATH, Docker Desktop, then Multipass. ROOT prefixes the application paths.
    """
    env = os.environ if env is None else env
    candidates: list[Candidate] = []

    if explicit:
        candidates.append(Candidate(Path(explicit).expanduser().absolute(), Source.OPTION))
    if env.get(HYPERKIT_ENV):
        candidates.append(Candidate(Path(env[HYPERKIT_ENV]).expanduser().absolute(), Source.ENV))

    on_path = shutil.which("hyperkit", path=env.get("PATH", os.defpath))
    if on_path is not None:
        candidates.append(Candidate(Path(on_path), Source.PATH))
    else:
        LOG.debug("no hyperkit on PATH")

    candidates += [Candidate(root / relative, Source.DOCKER_DESKTOP) for relative in DOCKER_DESKTOP_PATHS]
    candidates += [Candidate(root / relative, Source.MULTIPASS) for relative in MULTIPASS_PATHS]
    return candidates


def _inspect(candidate: Candidate) -> HyperkitBinary:
    path = candidate.path
    if not path.exists():
        raise _Unusable("not found")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise _Unusable("not an executable file")

    try:
        result = run([str(path), "-v"], check=False, timeout=VERSION_TIMEOUT_SECONDS)
    except (HkpodError, OSError) as error:
        raise _Unusable(f"failed to run it: {error}") from error
    if result.returncode != 0:
        raise _Unusable(f"`{path} -v` exited with status {result.returncode}, so it is not a working hyperkit")

    # hyperkit prints its version on stderr; stdout is read too in case a wrapper moves it.
    output = f"{result.stderr}\n{result.stdout}"
    version = parse_version(output)
    if version is None:
        LOG.debug("%s -v printed no release date: %r", path, output.strip()[:200])
    return HyperkitBinary(path=path, source=candidate.source, version=version)


def _too_old(binary: HyperkitBinary) -> HkpodError:
    assert binary.version is not None
    return HkpodError(
        f"hyperkit {binary.path} (from {binary.source.value}) is version {binary.version.text},"
        f" older than 0.{MIN_VERSION_DATE}, and cannot boot Linux 4.17 or newer",
        f"update it: {WHERE_TO_GET}",
    )


def find_hyperkit(
    explicit: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    root: Path = Path("/"),
    candidates: Sequence[Candidate] | None = None,
) -> HyperkitBinary:
    """Return the first usable hyperkit among CANDIDATES (by default hyperkit_candidates()).

    A path the user named (the --hyperkit option or $HKPOD_HYPERKIT) must work,
    or this raises. Other candidates that are missing, do not run or are older
    than 0.20190201 are skipped, and the reason is logged at debug level.
    """
    if candidates is None:
        candidates = hyperkit_candidates(explicit, env=env, root=root)
    too_old: list[HyperkitBinary] = []

    for candidate in candidates:
        try:
            binary = _inspect(candidate)
        except _Unusable as reason:
            if candidate.named_by_user:
                raise HkpodError(
                    f"hyperkit {candidate.path} (from {candidate.source.value}): {reason}", WHERE_TO_GET
                ) from None
            LOG.debug("skipping hyperkit candidate %s (%s): %s", candidate.path, candidate.source.value, reason)
            continue

        if binary.version is not None and binary.version.date < MIN_VERSION_DATE:
            if candidate.named_by_user:
                raise _too_old(binary)
            LOG.debug("skipping hyperkit %s: version %s is too old", binary.path, binary.version.text)
            too_old.append(binary)
            continue

        if binary.version is None:
            LOG.warning(
                "cannot tell the version of hyperkit %s; assuming it is 0.%d or newer", binary.path, MIN_VERSION_DATE
            )
        LOG.debug("using hyperkit %s from %s", binary.path, binary.source.value)
        return binary

    if too_old:
        raise _too_old(too_old[0])
    raise HkpodError("hyperkit not found", WHERE_TO_GET)


def _rosetta_translated() -> bool:
    # sysctl.proc_translated is 1 for an x86_64 process that Rosetta 2 runs on
    # Apple silicon; Intel Macs do not have the key, so sysctl fails there.
    try:
        result = run(["sysctl", "-n", "sysctl.proc_translated"], check=False, timeout=VERSION_TIMEOUT_SECONDS)
    except HkpodError:
        return False
    return result.returncode == 0 and result.stdout.strip() == "1"


def host_supports_hyperkit(
    *,
    system: str | None = None,
    machine: str | None = None,
    translated: bool | None = None,
) -> tuple[bool, str]:
    """Return whether this host can run hyperkit, and the reason when it cannot.

    hyperkit needs macOS on an Intel CPU. An x86_64 Python under Rosetta 2
    reports x86_64, so TRANSLATED (by default read from sysctl) catches Apple
    silicon there.
    """
    system = platform.system() if system is None else system
    if system != "Darwin":
        return False, f"HyperKit runs only on Intel Macs, and this is {system}: use --driver qemu"

    machine = platform.machine() if machine is None else machine
    if machine != "x86_64":
        return False, f"HyperKit runs only on Intel Macs, and this Mac has Apple silicon ({machine}): use --driver qemu"

    translated = _rosetta_translated() if translated is None else translated
    if translated:
        return False, (
            "HyperKit runs only on Intel Macs, and this Mac has Apple silicon"
            " (this Python runs under Rosetta 2): use --driver qemu"
        )
    return True, "macOS on an Intel CPU"
