"""Run the hyperkit stand-in as a subprocess against every row of the rejection tables."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hkpod.drivers.hyperkit.argv import HyperkitSpec, hyperkit_argv, kernel_cmdline, mac_query_argv, stable_uuid

from .kernels import write_bzimage, write_html_page
from .rejections import FIRMWARE, HYPERKIT_REJECTIONS, STAND_IN_REJECTIONS, Privilege, Rejection

FAKE = Path(__file__).with_name("fake_hyperkit.py")
NOBODY = 65534
# Generous bounds so that a stand-in that hangs fails the test instead of blocking the run.
EXIT_TIMEOUT = 60
START_TIMEOUT = 60

IS_ROOT = os.geteuid() == 0


def sparse_file(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        file.truncate(size)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """The `{name}` placeholders of rejections.py, as paths in a fresh directory."""
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(bytes(4096))
    existing = tmp_path / "stale.pid"
    existing.write_text("4242")
    return {
        "kernel": str(write_bzimage(tmp_path / "vmlinuz")),
        "initrd": str(initrd),
        "html_kernel": str(write_html_page(tmp_path / "vmlinuz.html")),
        "disk": str(sparse_file(tmp_path / "disk.img", 1 << 20)),
        "seed": str(sparse_file(tmp_path / "seed.iso", 64 << 10)),
        "locked": str(sparse_file(tmp_path / "locked.img", 1 << 20)),
        "big_initrd": str(sparse_file(tmp_path / "big-initrd.img", 3 << 20)),
        "existing": str(existing),
        "missing": str(tmp_path / "missing"),
        "pidfile": str(tmp_path / "hyperkit.pid"),
        "pty": str(tmp_path / "console.pty"),
        "log": str(tmp_path / "console.log"),
        "long_cmdline": "x" * 2048,
    }


@pytest.fixture
def hyperkit(tmp_path: Path) -> Path:
    """The stand-in under the name "hyperkit", which it prints in its messages as hyperkit does."""
    path = tmp_path / "bin" / "hyperkit"
    path.parent.mkdir()
    path.symlink_to(FAKE)
    return path


@pytest.fixture(scope="module")
def public_hyperkit() -> Iterator[Path]:
    """A copy of the stand-in that an unprivileged user can read and run."""
    directory = Path(tempfile.mkdtemp(prefix="fake-hyperkit-"))
    try:
        directory.chmod(0o755)
        path = directory / "hyperkit"
        shutil.copyfile(FAKE, path)
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(directory)


def run_hyperkit(argv: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=EXIT_TIMEOUT, env=env, check=False
    )


def run_row(
    row: Rejection, hyperkit: Path, public_hyperkit: Path, files: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    args = [argument.format(**files) for argument in row.argv]
    if row.privilege is Privilege.ROOT and not IS_ROOT:
        pytest.skip("vmnet rows that need root")
    if row.privilege is not Privilege.USER or not IS_ROOT:
        return run_hyperkit([str(hyperkit), *args])

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv to run as an unprivileged user")
    command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", str(public_hyperkit), *args]
    return subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=EXIT_TIMEOUT, cwd="/", check=False
    )


ROWS = HYPERKIT_REJECTIONS + STAND_IN_REJECTIONS


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_rejection(row: Rejection, hyperkit: Path, public_hyperkit: Path, files: dict[str, str]) -> None:
    holder = None
    if "{locked}" in " ".join(row.argv):
        holder = os.open(files["locked"], os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        result = run_row(row, hyperkit, public_hyperkit, files)
    finally:
        if holder is not None:
            os.close(holder)

    expected = row.text.format(**files)
    output = getattr(result, row.stream)
    assert result.returncode == row.status, (result.stdout, result.stderr)
    if expected:
        assert any(line.startswith(expected) for line in output.splitlines()), output
    else:
        assert result.stdout == ""
        assert result.stderr == ""


def test_version(hyperkit: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAKE_HYPERKIT_VERSION", raising=False)

    result = run_hyperkit([str(hyperkit), "-v"])

    assert result.returncode == 0
    assert result.stderr.splitlines()[0] == "hyperkit: v0.20210107-fake"
    assert result.stdout == ""


def test_version_from_env(hyperkit: Path) -> None:
    result = run_hyperkit([str(hyperkit), "-v"], env={**os.environ, "FAKE_HYPERKIT_VERSION": "v0.20180403"})

    assert result.stderr.splitlines()[0] == "hyperkit: v0.20180403"


def test_version_name_follows_program(tmp_path: Path) -> None:
    docker = tmp_path / "com.docker.hyperkit"
    docker.symlink_to(FAKE)

    result = run_hyperkit([str(docker), "-v"])

    assert result.stderr.startswith("com.docker.hyperkit: v0.")


@pytest.mark.parametrize(("args", "status"), [(["-v", "-z"], 0), (["-z", "-v"], 1), (["-h"], 0)])
def test_options_act_in_order(hyperkit: Path, args: list[str], status: int) -> None:
    assert run_hyperkit([str(hyperkit), *args]).returncode == status


MAC = re.compile(r"MAC: ([0-9a-f]{2}(?::[0-9a-f]{2}){5})")


def query_mac(hyperkit: Path, name: str) -> bytes:
    result = run_hyperkit(mac_query_argv(str(hyperkit), stable_uuid(name)))
    assert result.returncode == 0, result.stdout + result.stderr
    match = MAC.fullmatch(result.stdout.strip())
    assert match is not None, result.stdout
    return bytes.fromhex(match.group(1).replace(":", ""))


@pytest.mark.skipif(not IS_ROOT, reason="vmnet, and so -M, needs root")
def test_mac_query(hyperkit: Path) -> None:
    mac = query_mac(hyperkit, "podman")

    assert mac[0] & 0x01 == 0, "multicast bit set"
    assert mac[0] & 0x02 == 0x02, "not locally administered"
    assert query_mac(hyperkit, "podman") == mac
    assert query_mac(hyperkit, "other") != mac


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[str], description: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if ready():
            return
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            pytest.fail(f"the stand-in exited with status {process.returncode} before {description}: {stdout}{stderr}")
        time.sleep(0.05)
    pytest.fail(f"no {description} after {START_TIMEOUT} s")


def has_text(path: Path) -> bool:
    return path.exists() and path.read_text() != ""


def wait_for_pid_file(path: Path, process: subprocess.Popen[str]) -> int:
    wait_until(lambda: has_text(path), process, f"pid file {path}")
    return int(path.read_text())


def stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=EXIT_TIMEOUT)


@pytest.fixture
def machine(tmp_path: Path, files: dict[str, str]) -> HyperkitSpec:
    directory = tmp_path / "Application Support" / "machine one"
    directory.mkdir(parents=True)
    return HyperkitSpec(
        cpus=2,
        memory_mib=512,
        uuid=stable_uuid("podman"),
        pid_file=directory / "hyperkit.pid",
        disk=sparse_file(directory / "disk.img", 1 << 20),
        seed_iso=sparse_file(directory / "seed.iso", 64 << 10),
        console_pty=directory / "console.pty",
        console_log=directory / "console.log",
        kernel=Path(files["kernel"]),
        initrd=Path(files["initrd"]),
        cmdline=kernel_cmdline(),
    )


@pytest.mark.skipif(not IS_ROOT, reason="hkpod's argv has virtio-net, and vmnet needs root")
def test_hkpod_argv_runs(hyperkit: Path, machine: HyperkitSpec) -> None:
    process = subprocess.Popen(
        hyperkit_argv(str(hyperkit), machine),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pid = wait_for_pid_file(machine.pid_file, process)
        # hyperkit sets up devices, and so the console files, after it writes the pid file.
        wait_until(lambda: has_text(machine.console_pty), process, "console pty file")
        wait_until(
            lambda: machine.console_log.exists() and machine.console_log.stat().st_size > 0, process, "console log"
        )
        pty = machine.console_pty.read_text()
        log_size = machine.console_log.stat().st_size
        with machine.disk.open("rb") as disk, pytest.raises(BlockingIOError):
            fcntl.flock(disk, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status = stop(process)
    finally:
        if process.poll() is None:
            process.kill()
    stdout, stderr = process.communicate()

    assert pid == process.pid
    assert pty.startswith("/dev/")
    assert log_size == 65536
    assert f"COM1 connected to {pty}" in stdout.splitlines()
    assert status == 0, stderr
    assert not machine.pid_file.exists()


def test_same_disk_twice(hyperkit: Path, files: dict[str, str], tmp_path: Path) -> None:
    def argv(name: str) -> list[str]:
        return [
            str(hyperkit),
            "-A",
            "-F",
            str(tmp_path / f"{name}.pid"),
            "-s",
            f"1:0,virtio-blk,{files['disk']}",
            "-s",
            "31,lpc",
            "-l",
            f"com1,autopty={tmp_path / name}.pty,log={tmp_path / name}.log",
            *[argument.format(**files) for argument in FIRMWARE],
        ]

    first = subprocess.Popen(
        argv("first"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        # The console (slot 31) is set up after the disk (slot 1), so the disk is locked by then.
        wait_until(lambda: has_text(tmp_path / "first.pty"), first, "console pty file")
        second = run_hyperkit(argv("second"))
        first_status = stop(first)
    finally:
        if first.poll() is None:
            first.kill()

    assert second.returncode == 1
    assert "Could not lock backing file: Resource temporarily unavailable" in second.stderr.splitlines()
    assert not (tmp_path / "second.pid").exists()
    assert first_status == 0


def test_pid_file_survives_abort(hyperkit: Path, files: dict[str, str]) -> None:
    result = run_hyperkit(
        [str(hyperkit), "-F", files["pidfile"], "-f", f"kexec,{files['html_kernel']},{files['initrd']}"]
    )

    assert result.returncode == -signal.SIGABRT
    assert Path(files["pidfile"]).exists()


def test_pid_file_removed_on_error_exit(hyperkit: Path, files: dict[str, str]) -> None:
    args = ["-F", files["pidfile"], "-s", "31,lpc", "-l", "com1,bogus", *[a.format(**files) for a in FIRMWARE]]

    result = run_hyperkit([str(hyperkit), *args])

    assert result.returncode == 1
    assert not Path(files["pidfile"]).exists()


def test_stale_pid_file_untouched(hyperkit: Path, files: dict[str, str]) -> None:
    run_hyperkit([str(hyperkit), "-F", files["existing"], *[a.format(**files) for a in FIRMWARE]])

    assert Path(files["existing"]).read_text() == "4242"
