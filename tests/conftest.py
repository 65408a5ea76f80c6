"""Shared test fixtures: an isolated hkpod home per test, tool checks, and the test guest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"


def _default_test_image_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "hkpod" / "test-image"


# Resolved before any fixture changes HOME.
TEST_IMAGE_DIR = Path(os.environ.get("HKPOD_TEST_IMAGE_DIR") or _default_test_image_dir())


def require_tool(name: str) -> str:
    """Return the path of NAME; skip the test without it, except in CI, where a missing tool fails."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/setup installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # CI must prove the e2e tests ran: a skipped e2e test counts as a failure there.
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and item.get_closest_marker("e2e") is not None:
        report.outcome = "failed"
        report.longrepr = f"e2e test skipped in CI: {report.longrepr}"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point hkpod, ssh's known_hosts and podman's connection list at a fresh directory."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HKPOD_HOME", str(home / "hkpod"))
    monkeypatch.setenv("HKPOD_CACHE", str(home / "cache"))
    # podman refuses to run when CONTAINERS_CONF names a missing file.
    (home / "containers.conf").touch()
    monkeypatch.setenv("CONTAINERS_CONF", str(home / "containers.conf"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    # Nothing in a test may reach Ubuntu's servers: a catalog image without --mirror goes to a closed loopback port.
    monkeypatch.setenv("HKPOD_MIRROR", "http://127.0.0.1:9/")
    monkeypatch.delenv("CONTAINER_HOST", raising=False)
    monkeypatch.delenv("CONTAINER_CONNECTION", raising=False)
    return home


@dataclass(frozen=True)
class GuestImage:
    """The Debian guest that replaces Ubuntu's cloud image in tests."""

    dir: Path

    @property
    def raw(self) -> Path:
        return self.dir / "disk.raw"

    @property
    def qcow2(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rootfs_tar(self) -> Path:
        return self.dir / "rootfs.tar"


@pytest.fixture(scope="session")
def test_image() -> GuestImage:
    image = GuestImage(TEST_IMAGE_DIR)
    if not (image.dir / "manifest.json").is_file():
        message = f"no test guest in {image.dir}: run scripts/build-test-image (scripts/test does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return image


def run_hkpod(args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 900,
              check: bool = False, user: str | None = None, python: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as the current user or as USER through runuser (which sets HOME to USER's).

    PYTHON replaces this interpreter, for a USER who cannot run it.
    """
    argv = [python or sys.executable, "-m", "hkpod", *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    result = subprocess.run(argv, env=env or dict(os.environ), cwd=REPO, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"hkpod {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
